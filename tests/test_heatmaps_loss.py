import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lgcn_jax.heatmaps import argmax_subpixel, refine_at, render_targets, splat
from lgcn_jax.kernel_conv import Kernel, gaussian_mixture_kernel, kernel_conv
from lgcn_jax.loss import heatmap_loss

K = Kernel(gaussian_mixture_kernel(45, (0.2215, 0.3424, 0.4283), (1.1203, 3.871, 7.9291)))


def test_targets_equal_blurred_splat():
    lm = jax.random.uniform(jax.random.key(0), (2, 68, 2), minval=-5, maxval=101)
    t, inside = render_targets(lm, 96, 96, K)
    ref = kernel_conv(splat(lm, 96, 96), K)
    np.testing.assert_allclose(t, ref, atol=2e-5)
    np.testing.assert_allclose(inside, np.asarray(splat(lm, 96, 96)).sum((1, 2)), atol=1e-5)


def test_splat_is_bilinear():
    m = np.asarray(splat(jnp.array([[[3.25, 7.5]]]), 12, 12))[0, :, :, 0]
    assert m.sum() == pytest.approx(1.0)
    assert m[7, 3] == pytest.approx(0.75 * 0.5) and m[8, 4] == pytest.approx(0.25 * 0.5)


@pytest.mark.parametrize("radius", [1, 8])
def test_subpixel_recovery_from_rendered_targets(radius):
    rng = np.random.default_rng(0)
    lm = rng.uniform(20, 76, (3, 68, 2)).astype(np.float32)
    t, _ = render_targets(jnp.asarray(lm), 96, 96, K)
    est, peak = argmax_subpixel(t, radius)
    err = np.abs(np.asarray(est) - lm)
    assert err.max() < (0.1 if radius == 1 else 0.06), err.max()
    assert np.all(np.asarray(peak) > 0.5)


def test_window_fit_averages_pixel_noise():
    """On targets with pixel noise the (2r+1)^2 log-quadratic fit is far closer than the 3-point one."""
    rng = np.random.default_rng(1)
    lm = rng.uniform(20, 76, (4, 68, 2)).astype(np.float32)
    t, _ = render_targets(jnp.asarray(lm), 96, 96, K)
    noisy = t + 0.01 * jnp.asarray(rng.normal(size=t.shape), jnp.float32)
    err = {r: np.linalg.norm(np.asarray(argmax_subpixel(noisy, r)[0]) - lm, axis=-1).mean() for r in (1, 8)}
    assert err[8] < 0.5 * err[1], err


def test_refine_at_matches_reference():
    """jnp window fits (f32) == a per-map NumPy least-squares solve (f64), at borders, off-peak pixels, on flat,
    negative and empty maps, and for windows larger than the map (capped)."""
    from tests import reference_postprocess as ref

    rng = np.random.default_rng(2)
    h, w, n = 40, 36, 24
    ys, xs = np.mgrid[0:h, 0:w]
    centres = rng.uniform(-3, [w + 2, h + 2], (n, 2))
    maps = np.exp(-((xs[..., None] - centres[:, 0]) ** 2 + (ys[..., None] - centres[:, 1]) ** 2) / (2 * rng.uniform(1.5, 6, n) ** 2))
    maps = maps + 0.02 * rng.normal(size=maps.shape)
    maps[..., 0] = 0.0  # empty
    maps[..., 1] -= 0.5  # mostly negative
    maps[..., 2] = np.round(maps[..., 2] * 4) / 4  # flat plateaus
    maps = maps.astype(np.float32)
    iy, ix = np.asarray(rng.integers(0, h, n), np.int32), np.asarray(rng.integers(0, w, n), np.int32)
    top = maps.reshape(-1, n).argmax(0)
    iy[3:12], ix[3:12] = top[3:12] // w, top[3:12] % w  # at the maxima; the rest anywhere
    iy[4], ix[5] = 0, w - 1
    for radius in (1, 2, 5, 40):
        got, value = refine_at(jnp.asarray(maps), jnp.asarray(iy), jnp.asarray(ix), radius)
        want = np.array([ref.refine(maps[..., l].astype(np.float64), iy[l], ix[l], radius) for l in range(n)])
        np.testing.assert_allclose(np.asarray(got), want, atol=2e-3, err_msg=f"radius {radius}")
        np.testing.assert_array_equal(np.asarray(value), maps[iy, ix, np.arange(n)])


def test_loss_zero_at_target_and_weights():
    lm = jnp.array([[[10.0, 12.0], [200.0, 5.0]]])  # second point outside a 32x32 image
    k = Kernel(gaussian_mixture_kernel(9, (1.0,), (1.5,)))
    t, inside = render_targets(lm, 32, 32, k)
    assert float(heatmap_loss(t, t, lm, k)[0]) == 0.0
    np.testing.assert_allclose(inside, [[1.0, 0.0]])
    # Unit error on one pixel per map weighs by 0.1 + inside + 0.5 * mean(inside) (x2 outputs x 0.05).
    for j, w in enumerate([0.1 + 1 + 0.25, 0.1 + 0 + 0.25]):
        bump = jnp.zeros_like(t).at[0, 0, 0, j].add(1.0)
        got = float(heatmap_loss(t + bump, t, lm, k)[0])
        assert got == pytest.approx(0.05 * w, rel=1e-5)
    # A mask removes a point entirely.
    bump = jnp.zeros_like(t).at[0, 0, 0, 1].add(1.0)
    assert float(heatmap_loss(t + bump, t, lm, k, mask=jnp.array([[1.0, 0.0]]))[0]) == 0.0


def test_loss_with_a_teacher_mixes_its_maps_into_the_target():
    """Distillation: the target is (1 - w) * rendered + w * teacher; a teacher that is the rendered target changes
    nothing, and with w = 1 the outputs are pulled to the teacher's maps alone."""
    lm = jnp.array([[[10.0, 12.0], [20.0, 5.0]]])
    k = Kernel(gaussian_mixture_kernel(9, (1.0,), (1.5,)))
    t, _ = render_targets(lm, 32, 32, k)
    o1, o2 = t + 0.1, t - 0.05
    plain = heatmap_loss(o1, o2, lm, k)
    np.testing.assert_allclose(heatmap_loss(o1, o2, lm, k, teacher=t, teacher_weight=0.7), plain, rtol=1e-6)
    teacher = jnp.roll(t, 3, axis=1)
    assert float(heatmap_loss(teacher, teacher, lm, k, teacher=teacher, teacher_weight=1.0)[0]) == 0.0
    half = heatmap_loss(o1, o2, lm, k, teacher=teacher, teacher_weight=0.5)
    np.testing.assert_allclose(half, heatmap_loss(o1, o2, lm, k, teacher=0.5 * (t + teacher), teacher_weight=1.0), rtol=1e-6)


def test_loss_gradient_finite_difference():
    k = Kernel(gaussian_mixture_kernel(7, (1.0,), (1.0,)))
    lm = jnp.array([[[5.0, 6.0], [9.5, 3.25]]])
    o = jax.random.normal(jax.random.key(1), (1, 12, 12, 2)) * 0.1
    f = lambda o: heatmap_loss(o, o * 0.5, lm, k).sum()
    g = jax.grad(f)(o)
    d = jax.random.normal(jax.random.key(2), o.shape)
    eps = 1e-2
    fd = (f(o + eps * d) - f(o - eps * d)) / (2 * eps)
    assert float(jnp.sum(g * d)) == pytest.approx(float(fd), rel=1e-3)
