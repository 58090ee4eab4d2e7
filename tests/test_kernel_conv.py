import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lgcn_jax.kernel_conv import Kernel, gaussian_mixture_kernel, kernel_conv, kernel_conv_direct
from tests.conftest import all_eqns


def rel(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


KERNELS = {
    "lgcn45": Kernel(gaussian_mixture_kernel(45, (0.2215, 0.3424, 0.4283), (1.1203, 3.871, 7.9291))),
    "random_full_rank": Kernel(np.random.default_rng(0).normal(size=(9, 9))),
    "asymmetric_rect": Kernel(np.random.default_rng(1).normal(size=(5, 11))),
}


BATCHINGS = ("auto", "image", "batch")


@pytest.mark.parametrize("batching", BATCHINGS)
@pytest.mark.parametrize("name", sorted(KERNELS))
@pytest.mark.parametrize("shape", [(2, 24, 24, 3), (1, 17, 30, 5), (3, 50, 40, 2)])
def test_matches_direct_depthwise(name, shape, batching):
    k = KERNELS[name]
    x = jax.random.normal(jax.random.key(hash((name, shape)) % 2**31), shape)
    assert rel(kernel_conv(x, k, batching=batching), kernel_conv_direct(x, k)) < 1e-5


def test_lgcn_kernel_is_rank_three_and_full_size():
    k = KERNELS["lgcn45"]
    assert k.rank == 3
    x = jax.random.normal(jax.random.key(3), (2, 96, 96, 4))
    assert rel(kernel_conv(x, k), kernel_conv_direct(x, k)) < 1e-5


@pytest.mark.parametrize("precision, expect", [(jax.lax.Precision.HIGHEST, "HIGHEST"), (None, "DEFAULT"), ("default", "DEFAULT")])
def test_precision_reaches_both_matmuls(precision, expect):
    # Full f32 unless asked otherwise: on a GPU, DEFAULT lets XLA use TF32 for the blur.
    x = jnp.ones((1, 12, 12, 2))
    args = () if precision is jax.lax.Precision.HIGHEST else (precision,)  # HIGHEST is also the default
    text = jax.jit(lambda x: kernel_conv(x, KERNELS["lgcn45"], *args)).lower(x).as_text()
    found = [line for line in text.splitlines() if "dot_general" in line]
    assert len(found) == 2 and all(f"precision = [{expect}, {expect}]" in line for line in found), found
    assert rel(kernel_conv(x, KERNELS["lgcn45"], precision), kernel_conv_direct(x, KERNELS["lgcn45"])) < 1e-5


@pytest.mark.parametrize("batching", BATCHINGS)
@pytest.mark.parametrize("name", ["lgcn45", "asymmetric_rect"])
def test_gradient_matches_direct(name, batching):
    # "image" has its own backward pass (the blur by the flipped kernel): the asymmetric kernel checks the flip.
    k = KERNELS[name]
    x = jax.random.normal(jax.random.key(4), (3, 48, 40, 3))
    ct = jax.random.normal(jax.random.key(5), (3, 48, 40, 3))
    g_fast = jax.grad(lambda x: jnp.sum(kernel_conv(x, k, batching=batching) * ct))(x)
    g_ref = jax.grad(lambda x: jnp.sum(kernel_conv_direct(x, k) * ct))(x)
    assert rel(g_fast, g_ref) < 1e-5


def test_impulse_reproduces_kernel_at_offset():
    vals = np.random.default_rng(2).normal(size=(7, 5))
    x = np.zeros((1, 20, 20, 1), np.float32)
    x[0, 10, 10, 0] = 1.0
    out = np.asarray(kernel_conv(x, Kernel(vals)))[0, :, :, 0]
    # Cross-correlation: an impulse at (10, 10) shows the kernel flipped.
    np.testing.assert_allclose(out[7:14, 8:13], vals[::-1, ::-1], atol=1e-5)


def test_jit_vmap_and_static_kernel():
    k = KERNELS["random_full_rank"]
    x = jax.random.normal(jax.random.key(6), (4, 2, 16, 16, 3))
    vm = jax.vmap(lambda xi: kernel_conv(xi, k))(x)
    loop = jnp.stack([kernel_conv(xi, k) for xi in x])
    assert rel(vm, loop) < 1e-6
    assert Kernel(k.values) == k and hash(Kernel(k.values)) == hash(k)


@pytest.mark.parametrize(
    "bad, msg",
    [(np.ones((4, 4)), "odd sides"), (np.ones(5), "odd sides"), (np.full((3, 3), np.nan), "non-finite")],
)
def test_bad_kernels(bad, msg):
    with pytest.raises(ValueError, match=msg):
        Kernel(bad)


def test_bad_input_rank():
    with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
        kernel_conv(jnp.zeros((8, 8, 1)), KERNELS["random_full_rank"])


def test_gaussian_mixture_kernel_errors():
    with pytest.raises(ValueError, match="odd"):
        gaussian_mixture_kernel(44, (1.0,), (1.0,))
    with pytest.raises(ValueError, match="as many"):
        gaussian_mixture_kernel(5, (1.0, 2.0), (1.0,))


@pytest.mark.parametrize("batching", ["image", "batch"])
def test_no_layout_transpose_of_the_maps(batching):
    """Both matmuls read and write NHWC as it lies: no transpose of a map-sized array.  (On a GPU the
    einsum form's transposes moved twice the blur's bytes; bench/gpu_hlo_offline.py.)  Forward only:
    autodiff writes the backward matmuls' operand orders as transposes, which XLA folds into them."""
    x = jnp.ones((2, 24, 20, 3))
    eqns = list(all_eqns(jax.make_jaxpr(lambda x: kernel_conv(x, KERNELS["lgcn45"], batching=batching))(x).jaxpr))
    moved = [e for e in eqns if e.primitive.name == "transpose" and e.outvars[0].aval.size >= 24 * 20 * 3]
    assert not moved, moved
    assert sum(e.primitive.name == "dot_general" for e in eqns) == 2


def test_batching_by_platform():
    """"auto" lowers the loop over images for a CPU and the batched matmuls for a GPU (a lowering only: no GPU needed)."""
    x = jnp.ones((4, 24, 20, 3))
    f = jax.jit(lambda x: kernel_conv(x, KERNELS["lgcn45"]))
    cpu = f.trace(x).lower(lowering_platforms=("cpu",)).as_text()
    gpu = f.trace(x).lower(lowering_platforms=("cuda",)).as_text()
    assert "stablehlo.while" in cpu and "stablehlo.while" not in gpu
    assert jax.jit(lambda x: kernel_conv(x, KERNELS["lgcn45"], batching="image")).lower(x).as_text().count("stablehlo.while") == 1


def test_bad_batching():
    with pytest.raises(ValueError, match="batching must be"):
        kernel_conv(jnp.zeros((2, 8, 8, 1)), KERNELS["random_full_rank"], batching="rows")
