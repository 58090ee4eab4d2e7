"""Shape model and post-processing: jnp against the NumPy/SciPy reference, recovery, robustness, errors."""

import dataclasses
import os
import shutil
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize

import lgcn_jax
from data_prep.synthetic_faces import make_face
from lgcn_jax.config import PostprocessConfig
from lgcn_jax.heatmaps import render_targets
from lgcn_jax.network import model_kernel
from lgcn_jax.postprocess import cho_solve, cholesky, solve_qp
from lgcn_jax.shape_model import ShapeModelError, build_shape_model, load_shape_model, save_shape_model
from tests import reference_postprocess as ref

SIZE = 64
KERNEL = model_kernel(lgcn_jax.get_config("quick").model)  # the 31x31 kernel of 64-pixel crops


@pytest.fixture(scope="module")
def train_shapes():
    return np.stack([make_face(s, SIZE)[1] for s in range(150)])


@pytest.fixture(scope="module")
def models(train_shapes):
    return build_shape_model(train_shapes, SIZE), ref.build_model(train_shapes, SIZE)


def _heatmaps(points, amplitude=None, noise=0.0, seed=0):
    hm = np.asarray(render_targets(jnp.asarray(points, jnp.float32), SIZE, SIZE, KERNEL)[0])
    rng = np.random.default_rng(seed)
    if amplitude is not None:
        hm = hm * amplitude
    if noise:
        hm = hm + noise * rng.normal(size=hm.shape)
    return hm.astype(np.float32)


def _test_faces(n, jitter=0.0, seed=1):
    rng = np.random.default_rng(seed)
    return np.stack([make_face(5000 + s, SIZE)[1] for s in range(n)]) + rng.normal(0, jitter, (n, 68, 2))


def test_shape_model_matches_reference(models, train_shapes):
    sm, rm = models
    np.testing.assert_allclose(np.asarray(sm.mean), rm["mean"], atol=1e-4)
    a, b = np.asarray(sm.components).reshape(12, -1), rm["components"].reshape(12, -1)
    np.testing.assert_allclose(np.abs((a * b).sum(1)), (b * b).sum(1), rtol=1e-4)  # equal up to sign
    # The reduced constraints imply exactly the full set of orders of the reference.
    n = 136
    reach = np.zeros((n, n), bool)
    reach[np.asarray(sm.lower), np.asarray(sm.upper)] = True
    for k in range(n):  # transitive closure (Floyd-Warshall)
        reach |= reach[:, k:k + 1] & reach[k:k + 1, :]
    full = np.zeros((n, n), bool)
    full[rm["pairs"][:, 0], rm["pairs"][:, 1]] = True
    np.testing.assert_array_equal(reach, full)
    assert len(sm.lower) < len(rm["pairs"]) / 3


def test_shape_model_save_load_round_trip(models, tmp_path):
    sm, _ = models
    save_shape_model(str(tmp_path), sm)
    back = load_shape_model(str(tmp_path))
    for f in ("mean", "components", "lower", "upper"):
        np.testing.assert_array_equal(np.asarray(getattr(back, f)), np.asarray(getattr(sm, f)))
    assert back.image_size == SIZE


def test_workdir_shape_model_is_written_from_the_training_split(models, train_shapes, tmp_path):
    from lgcn_jax import train

    cfg = lgcn_jax.apply_overrides(lgcn_jax.get_config("quick"), ["postprocess.num_components=3"])
    path = train.write_shape_model(cfg, str(tmp_path / "a"), {"landmarks": train_shapes[:4]})
    assert load_shape_model(os.path.dirname(path)).num_components == 3  # one fewer than the 4 shapes would allow
    with pytest.raises(lgcn_jax.DatasetError, match="at least 2 training faces"):
        train.write_shape_model(cfg, str(tmp_path / "b"), {"landmarks": train_shapes[:1]})
    path = train.write_shape_model(lgcn_jax.get_config("quick"), str(tmp_path / "c"), {"landmarks": train_shapes})
    np.testing.assert_allclose(np.asarray(load_shape_model(os.path.dirname(path)).mean), np.asarray(models[0].mean), atol=1e-5)


def test_shape_model_file_errors(tmp_path):
    with pytest.raises(ShapeModelError, match="no shape model.*--shape_model_only"):
        load_shape_model(str(tmp_path))
    (tmp_path / "shape_model.npz").write_bytes(b"not a zip")
    with pytest.raises(ShapeModelError, match="corrupt"):
        load_shape_model(str(tmp_path))
    with pytest.raises(ValueError, match="at least 13"):
        build_shape_model(np.zeros((5, 68, 2)), SIZE)


@pytest.mark.parametrize("k", [1, 5, 12])
def test_cholesky_and_cho_solve_match_numpy(k):
    rng = np.random.default_rng(k)
    m = rng.normal(size=(3, k, k))
    a = (m @ m.transpose(0, 2, 1) + k * np.eye(k)).astype(np.float32)
    b = rng.normal(size=(3, k)).astype(np.float32)
    low = jax.jit(jax.vmap(cholesky))(a)  # batched, as under the decoding's vmap over faces
    np.testing.assert_allclose(low, np.linalg.cholesky(a.astype(np.float64)), atol=2e-5)
    np.testing.assert_allclose(jax.jit(jax.vmap(cho_solve))(low, b), np.linalg.solve(a.astype(np.float64), b[..., None])[..., 0], rtol=1e-4, atol=1e-5)
    assert np.all(np.triu(np.asarray(low[0]), 1) == 0)


def test_cholesky_of_an_indefinite_matrix_is_nan():
    low = jax.jit(cholesky)(np.diag([1.0, -1.0, 2.0]).astype(np.float32))
    assert low[0, 0] == 1.0 and np.isnan(low[1, 1]) and np.isnan(low[2, 2])


def test_qp_solver_matches_scipy():
    rng = np.random.default_rng(0)
    for trial in range(5):
        k, m = 12, 300
        q = rng.normal(size=(k, k))
        hess = q @ q.T + 0.1 * np.eye(k)
        grad = rng.normal(size=k) * 10
        a = rng.normal(size=(m, k))
        bound = rng.uniform(0.1, 2.0, m)  # x = 0 strictly feasible
        x = np.asarray(solve_qp(jnp.asarray(hess, jnp.float32), jnp.asarray(grad, jnp.float32), jnp.asarray(a, jnp.float32),
                                jnp.asarray(bound, jnp.float32), 30))
        res = optimize.minimize(lambda z: 0.5 * z @ hess @ z + grad @ z, np.zeros(k), jac=lambda z: hess @ z + grad, method="SLSQP",
                                constraints=[{"type": "ineq", "fun": lambda z: bound - a @ z, "jac": lambda z: -a}], options={"ftol": 1e-11, "maxiter": 500})
        assert res.success
        assert np.sum(a @ res.x > bound - 1e-6) >= 1  # the test is only meaningful with active constraints
        np.testing.assert_allclose(x, res.x, atol=2e-3 * max(1.0, np.abs(res.x).max()))
        assert np.all(a @ x <= bound + 1e-3)


STAGES = [
    ("global", dict(windows=(), blend=False), PostprocessConfig(local_windows=(), blend=False)),
    ("global+local", dict(blend=False), PostprocessConfig(blend=False)),
    ("full", {}, PostprocessConfig()),
    ("unconstrained", dict(constraints=False), PostprocessConfig(constraints=False)),
    ("3-point peaks", dict(peak_fit_radius=1), PostprocessConfig(peak_fit_radius=1)),
    ("wide peak fits", dict(peak_fit_radius=30), PostprocessConfig(peak_fit_radius=30)),
]


@pytest.mark.parametrize("name,ref_kw,cfg", STAGES, ids=[s[0] for s in STAGES])
def test_postprocess_matches_reference(models, name, ref_kw, cfg):
    """Noisy heatmaps of uneven confidence at jittered shapes: jnp (f32, interior point) == SciPy (f64, SLSQP)."""
    sm, rm = models
    rng = np.random.default_rng(3)
    hm = _heatmaps(_test_faces(2, jitter=1.5), amplitude=rng.uniform(0.05, 1.0, (2, 1, 1, 68)), noise=0.02, seed=3)
    want = ref.postprocess(hm, rm, **ref_kw)
    got = np.asarray(lgcn_jax.postprocess(hm, sm, cfg))
    np.testing.assert_allclose(got, want, atol=0.02)


def test_exact_recovery_from_rendered_heatmaps(models):
    sm, _ = models
    truth = _test_faces(8)
    hm = _heatmaps(truth)
    argmax = np.asarray(lgcn_jax.postprocess(hm, None, PostprocessConfig(use_shape_model=False)))
    assert np.abs(argmax - truth).max() < 0.1
    full, conf = lgcn_jax.postprocess_with_confidence(hm, sm)
    err = np.linalg.norm(np.asarray(full) - truth, axis=-1)
    # The blend weight is the peak value (0.85-0.99 for sub-pixel peaks), so a few % of the fit's error
    # (up to ~1 px here) stays on top of the arg-max's.
    assert err.mean() < 0.08 and err.max() < 0.15
    assert np.all(np.asarray(conf) > 0.85)


def test_false_peak_is_pulled_back(models):
    """One map with a strong false peak 25+ px away and a weak true one: arg-max jumps, the shape model does not."""
    sm, _ = models
    truth = _test_faces(1)
    lm = 30  # nose tip
    wrong = truth.copy()
    wrong[0, lm] = truth[0, lm] + np.array([22.0, 16.0])
    hm = _heatmaps(truth)
    true_map = hm[0, :, :, lm].copy()
    hm[0, :, :, lm] = _heatmaps(wrong)[0, :, :, lm] + 0.3 * true_map
    argmax = np.asarray(lgcn_jax.postprocess(hm, None, PostprocessConfig(use_shape_model=False)))
    assert np.linalg.norm(argmax[0, lm] - truth[0, lm]) > 20
    fit = np.asarray(lgcn_jax.postprocess(hm, sm, PostprocessConfig(blend=False)))
    full = np.asarray(lgcn_jax.postprocess(hm, sm))
    assert np.linalg.norm(fit[0, lm] - truth[0, lm]) < 3.0
    assert np.linalg.norm(full[0, lm] - truth[0, lm]) < 3.0
    others = np.delete(np.arange(68), lm)
    assert np.linalg.norm(full[0, others] - truth[0, others], axis=-1).max() < 0.5


def test_batch_equals_single_and_jit_vmap(models):
    sm, _ = models
    hm = _heatmaps(_test_faces(3, jitter=1.0), noise=0.01)
    batch = np.asarray(lgcn_jax.postprocess(hm, sm))
    single = np.concatenate([np.asarray(lgcn_jax.postprocess(hm[i:i + 1], sm)) for i in range(3)])
    np.testing.assert_allclose(batch, single, atol=1e-4)


def test_predict_is_apply_then_postprocess(models):
    sm, _ = models
    cfg = lgcn_jax.get_config("quick")
    params = lgcn_jax.init(jax.random.key(0), cfg, image_size=SIZE)
    images = jnp.asarray(np.stack([make_face(s, SIZE)[0] for s in range(2)])[..., None])
    got = np.asarray(lgcn_jax.predict(params, images, sm))
    want = np.asarray(lgcn_jax.postprocess(lgcn_jax.apply(params, images), sm))
    np.testing.assert_allclose(got, want, atol=1e-3)
    plain = np.asarray(lgcn_jax.predict(params, images))  # no shape model: arg-max decoding, window fits of 8 x 64/96 px
    radius = round(PostprocessConfig().peak_fit_radius * SIZE / 96)
    np.testing.assert_allclose(plain, np.asarray(lgcn_jax.argmax_subpixel(lgcn_jax.apply(params, images), radius)[0]), atol=1e-5)


def test_bad_heatmaps_and_missing_model(models):
    sm, _ = models
    with pytest.raises(ValueError, match="67 channels but the shape model has 68"):
        lgcn_jax.postprocess(np.zeros((1, SIZE, SIZE, 67), np.float32), sm)
    with pytest.raises(ValueError, match="built for 64x64"):
        lgcn_jax.postprocess(np.zeros((1, 32, 32, 68), np.float32), sm)
    with pytest.raises(ValueError, match=r"\[B, H, W, L\]"):
        lgcn_jax.postprocess(np.zeros((SIZE, SIZE, 68), np.float32), sm)
    with pytest.raises(ValueError, match="no shape model given"):
        lgcn_jax.postprocess(np.zeros((1, SIZE, SIZE, 68), np.float32), None)


def _eval(args, capsys):
    from lgcn_jax.cli import eval as cli_eval

    capsys.readouterr()
    code = cli_eval.main(["--no_progress", *args])
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


def test_run_eval_writes_report_and_ced(trained_workdir, tmp_path, capsys):
    import json

    out = tmp_path / "eval"
    r = _eval(["--workdir", trained_workdir, "--split", "validation,test", "--out", str(out)], capsys)
    assert r.returncode == 0, r.stderr
    assert "inter_ocular" in r.stdout and "inter_pupil" in r.stdout
    rep = json.loads((out / "eval_test.json").read_text())
    assert rep["num_faces"] == 16 and len(rep["inter_pupil"]["per_image"]) == 16 and rep["decoder"] == "shape_model"
    errs = np.array(rep["inter_ocular"]["per_image"])
    assert rep["inter_ocular"]["nme"] == pytest.approx(errs.mean())
    assert rep["inter_ocular"]["failure@0.08"] == pytest.approx(np.mean(errs > 0.08))
    png = (out / "ced_validation.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_run_eval_errors(trained_workdir, tmp_path, capsys):
    r = _eval(["--workdir", trained_workdir, "--split", "challenging", "--out", str(tmp_path)], capsys)
    assert r.returncode == 1 and "split 'challenging' does not exist" in r.stderr
    bare = tmp_path / "bare"
    shutil.copytree(trained_workdir, bare, ignore=shutil.ignore_patterns("shape_model.npz", "eval"))
    r = _eval(["--workdir", str(bare), "--split", "test", "--out", str(tmp_path)], capsys)
    assert r.returncode == 1 and "no shape model" in r.stderr and "--shape_model_only" in r.stderr
    r = _eval(["--workdir", str(bare), "--split", "test", "--out", str(tmp_path), "--no_shape_model"], capsys)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "eval_test_argmax.json").exists()


def test_run_eval_takes_released_weights_by_name(synthetic_data_dir, tmp_path, capsys):
    import json
    import os

    r = _eval(["--checkpoint", "synthetic_quick", "--data_dir", synthetic_data_dir, "--split", "test", "--out", str(tmp_path)], capsys)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "eval_test.json").read_text())["checkpoint"].endswith(os.path.join("checkpoints", "synthetic_quick"))
    r = _eval(["--checkpoint", "synthetic_quik", "--split", "test", "--out", str(tmp_path)], capsys)
    assert r.returncode == 1 and "no released checkpoint of that name" in r.stderr and "'synthetic_quick'" in r.stderr


def test_run_eval_in_bf16(synthetic_data_dir, tmp_path, capsys):
    """--config execution.compute_dtype=bfloat16 runs the same weights with bf16 convolution blocks (recorded in the
    report; model.compute_dtype, the spelling before the execution section, too); the network's fields cannot be
    overridden at evaluation."""
    import json

    reps = {}
    for dtype, section in (("float32", "execution"), ("bfloat16", "model")):
        r = _eval(["--checkpoint", "synthetic_quick", "--data_dir", synthetic_data_dir, "--split", "test", "--out", str(tmp_path / dtype),
                   "--config", f"{section}.compute_dtype={dtype}", f"{section}.fold_batch_norm=false"], capsys)
        assert r.returncode == 0, r.stderr
        reps[dtype] = json.loads((tmp_path / dtype / "eval_test.json").read_text())
        assert reps[dtype]["compute_dtype"] == dtype
        execution = reps[dtype]["execution"]
        assert execution["compute_dtype"] == dtype and execution["fold_batch_norm"] is False and execution["backend"] == jax.default_backend()
        assert {"dilation_as_phases", "fused_batch_norm", "device_kind", "jax"} <= set(execution)
    a, b = (np.array(reps[d]["inter_ocular"]["per_image"]) for d in ("float32", "bfloat16"))
    assert not np.array_equal(a, b) and abs(a.mean() - b.mean()) < 0.05 * a.mean(), (a.mean(), b.mean())
    r = _eval(["--checkpoint", "synthetic_quick", "--split", "test", "--out", str(tmp_path), "--config", "model.num_filters=64"], capsys)
    assert r.returncode == 2 and "execution.*" in r.stderr and "not ['model.num_filters=64']" in r.stderr


# ---- the fast paths of a single face: same landmarks as the plain algorithm --------------------------------------------

def test_landmarks_equal_those_before_the_speed_up():
    """The synthetic test split through the synthetic_quick weights: within 0.05 px of the landmarks the post-processing
    gave before its single-face fast paths (tests/data/postprocess_before_speedup.npz, written by that code), batched
    (vmapped: every branch runs) and one face at a time (unbatched: only the branch taken runs)."""
    import os

    from lgcn_jax.datasets import resize_images as _resize

    before = np.load(os.path.join(os.path.dirname(__file__), "data", "postprocess_before_speedup.npz"))
    model = lgcn_jax.load_pretrained("synthetic_quick").with_postprocess(peak_fit_radius=1)  # the file's 3-point peaks
    images = _resize(np.stack([make_face(20_000_000 + i, 96)[0] for i in range(64)])[..., None], model.config.data.image_size)
    lm, conf = lgcn_jax.predict_with_confidence(model, images)
    assert np.abs(np.asarray(lm) - before["landmarks"]).max() <= 0.05
    np.testing.assert_allclose(np.asarray(conf), before["confidence"], atol=1e-4)
    for i in range(0, 64, 8):
        one, _ = lgcn_jax.predict_with_confidence(model, images[i:i + 1])
        assert np.abs(np.asarray(one)[0] - before["landmarks"][i]).max() <= 0.05
    am = lgcn_jax.predict(model, images, config=PostprocessConfig(use_shape_model=False, peak_fit_radius=1))
    # Equal up to float rounding: with jax 0.12 (Python >= 3.12) half of them differ by up to 8e-5 px from
    # the file written with jax 0.10 (another XLA version).
    np.testing.assert_allclose(np.asarray(am), before["argmax"], rtol=0, atol=1e-3)


def _bumpy_maps(seed, size=48, maps=68):
    """Smoothed noise: many local maxima, plateaus at the clipped floor, and exact ties."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    hm = ndimage.gaussian_filter(rng.normal(size=(size, size, maps)), (1.5, 1.5, 0))
    hm = np.round(np.maximum(hm, 0.0) * 50) / 50  # quantised: ties and flat zero regions
    return hm.astype(np.float32)


def test_windowed_nearest_peak_equals_the_whole_map_search():
    from lgcn_jax.postprocess import _nearest_peak, _nearest_peak_in_map

    rng = np.random.default_rng(0)
    for seed in range(4):
        hm = _bumpy_maps(seed)
        h = hm.shape[0]
        points = rng.uniform(-6, h + 5, (68, 2)).astype(np.float32)  # some off the map: the window proves nothing there
        points[:8] = rng.uniform(-0.5, 1.5, (8, 2)) * [1, h - 1]  # on the borders
        points[8] = [np.nan, 3.0]
        for fit_radius in (1, 5):
            want = jax.jit(_nearest_peak_in_map, static_argnums=2)(hm, points, fit_radius)
            for radius in (1, 3, 8, 30):
                got = jax.jit(_nearest_peak, static_argnums=(2, 3))(hm, points, radius, fit_radius)
                for g, w in zip(got, want):
                    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
        want = jax.jit(_nearest_peak_in_map)(hm, points)
        batched = jax.vmap(lambda a, b: _nearest_peak(a, b, 3))(hm[None], points[None])
        np.testing.assert_array_equal(np.asarray(batched[0][0]), np.asarray(want[0]))


def test_window_statistics_equal_a_dense_mask():
    from lgcn_jax.postprocess import _map_statistics, _window_statistics

    hm = _bumpy_maps(7, size=40)
    rng = np.random.default_rng(1)
    points = rng.uniform(-10, 50, (68, 2)).astype(np.float32)
    for half in (2, 7, 25):
        cx, cy = np.round(points[:, 0]), np.round(points[:, 1])
        ys, xs = np.arange(40.0), np.arange(40.0)
        mask = (np.abs(ys[:, None, None] - cy) <= half) & (np.abs(xs[None, :, None] - cx) <= half)
        w2 = np.where(mask & (hm > 0.01), hm, 0.0).astype(np.float64) ** 2
        total = w2.sum((0, 1))
        mean = np.stack([(w2 * xs[None, :, None]).sum((0, 1)), (w2 * ys[:, None, None]).sum((0, 1))], -1) / np.maximum(total, 1e-30)[:, None]
        got_total, got_mean = jax.jit(_window_statistics, static_argnums=(1, 3))(hm, 0.01, points, half)
        np.testing.assert_allclose(np.asarray(got_total), total, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(np.asarray(got_mean), mean, atol=1e-3)
    total, mean = _map_statistics(jnp.asarray(hm), 0.01)
    w2 = np.where(hm > 0.01, hm, 0.0).astype(np.float64) ** 2
    np.testing.assert_allclose(np.asarray(total), w2.sum((0, 1)), rtol=1e-5)


def test_qp_closed_form_when_feasible_interior_point_otherwise():
    from lgcn_jax.postprocess import _interior_point

    rng = np.random.default_rng(5)
    q = rng.normal(size=(12, 12))
    hess = (q @ q.T + 0.5 * np.eye(12)).astype(np.float32)
    grad = rng.normal(size=12).astype(np.float32)
    a = rng.normal(size=(200, 12)).astype(np.float32)
    free = np.linalg.solve(hess.astype(np.float64), -grad)
    loose = (np.abs(a @ free) + 1.0).astype(np.float32)  # every constraint inactive at the free minimum
    x = np.asarray(jax.jit(solve_qp)(hess, grad, a, loose))
    np.testing.assert_allclose(x, free, rtol=1e-4, atol=1e-5)
    scale = np.trace(hess) / 12
    ipm = np.asarray(_interior_point(hess / scale, grad / scale, a, loose, 30))
    np.testing.assert_allclose(ipm, free, atol=1e-3)
    tight = np.full(200, 0.05, np.float32)  # the free minimum violates some: the interior point decides
    assert np.any(a @ free > tight)
    np.testing.assert_allclose(np.asarray(jax.jit(solve_qp)(hess, grad, a, tight)), np.asarray(_interior_point(hess / scale, grad / scale, a, tight, 30)),
                               atol=1e-6)


def test_first_argmax_is_the_flat_argmax_with_ties_and_nan():
    from lgcn_jax.heatmaps import first_argmax

    hm = _bumpy_maps(3, size=20, maps=9)
    hm[..., 0] = 0.0  # all tied
    hm[5, 7, 1] = np.nan
    hm[2, 3, 2] = hm[9, 1, 2] = 10.0  # two equal maxima
    iy, ix = first_argmax(jnp.asarray(hm))
    flat = np.argmax(np.moveaxis(hm, -1, 0).reshape(9, -1), axis=-1)
    np.testing.assert_array_equal(np.asarray(iy) * 20 + np.asarray(ix), flat)


# ---- test-time mirroring (postprocess.flip_test) -----------------------------------------------------------------------

MIRROR_OF = {0: 16, 17: 26, 31: 35, 36: 45, 37: 44, 39: 42, 41: 46, 48: 54, 49: 53, 60: 64, 61: 63, 65: 67, 27: 27, 30: 30, 57: 57}


def test_mirror_permutation_pairs_the_points_of_the_markup():
    """A hand-written table of the iBUG markup's left/right pairs (jaw ends, brow ends, nostrils, eye and mouth
    corners, lids, inner lip; the midline maps to itself) against the permutation that the mirroring uses."""
    from lgcn_jax.landmarks68 import FLIP_PERMUTATION

    for a, b in MIRROR_OF.items():
        assert FLIP_PERMUTATION[a] == b and FLIP_PERMUTATION[b] == a
    np.testing.assert_array_equal(FLIP_PERMUTATION[FLIP_PERMUTATION], np.arange(68))


def test_flip_test_averages_with_the_mirror_image_and_is_mirror_symmetric():
    """heatmaps(flip_test=True) is the mean of the image's maps and the mirror image's maps, mirrored back (a plain
    loop over the maps here); so a mirrored face gets exactly the mirrored landmarks (arg-max decoding), which the
    network alone does not give; predict and a Model with flip_test decode those maps."""
    import importlib

    from lgcn_jax.landmarks68 import FLIP_PERMUTATION

    predict_mod = importlib.import_module("lgcn_jax.predict")  # the module: lgcn_jax.predict is also the function
    model = lgcn_jax.load_pretrained("synthetic_quick")
    images = np.stack([make_face(s, SIZE)[0] for s in (7000, 7001)])[..., None].astype(np.float32) / 255.0
    got = np.asarray(predict_mod.heatmaps(model.params, images, flip_test=True))
    plain, mirrored = np.asarray(lgcn_jax.apply(model.params, images)), np.asarray(lgcn_jax.apply(model.params, images[:, :, ::-1]))
    want = np.empty_like(plain)
    for k in range(68):
        want[..., k] = 0.5 * (plain[..., k] + mirrored[:, :, ::-1, FLIP_PERMUTATION[k]])
    np.testing.assert_allclose(got, want, atol=1e-6)

    def mirror_points(lm):
        return np.stack([SIZE - 1 - lm[..., 0], lm[..., 1]], -1)[:, FLIP_PERMUTATION]

    argmax = PostprocessConfig(use_shape_model=False)
    flip = model.with_postprocess(flip_test=True)
    a = np.asarray(lgcn_jax.predict(flip.params, images, config=dataclasses.replace(argmax, flip_test=True)))
    b = np.asarray(lgcn_jax.predict(flip.params, images[:, :, ::-1], config=dataclasses.replace(argmax, flip_test=True)))
    np.testing.assert_allclose(b, mirror_points(a), atol=1e-4)
    a0 = np.asarray(lgcn_jax.predict(model.params, images, config=argmax))
    b0 = np.asarray(lgcn_jax.predict(model.params, images[:, :, ::-1], config=argmax))
    assert np.abs(b0 - mirror_points(a0)).max() > 0.05  # not so without flip_test
    np.testing.assert_allclose(np.asarray(lgcn_jax.predict(flip, images)),
                               np.asarray(lgcn_jax.postprocess(got, model.shape_model, flip.config.postprocess)), atol=1e-4)
    assert model.config.postprocess.flip_test is False and flip.params is model.params


def test_flip_test_settings_errors():
    model = lgcn_jax.load_pretrained("synthetic_quick")
    with pytest.raises(ValueError, match=r"unknown postprocess settings \['flip'\].*flip_test"):
        model.with_postprocess(flip=True)
    cfg = lgcn_jax.get_config("quick")
    with pytest.raises(ValueError, match="flip_test needs the 68-point markup.*5 points"):
        lgcn_jax.apply_overrides(cfg, ["model.num_landmarks=5", "postprocess.flip_test=true"])
    five = lgcn_jax.init(jax.random.key(0), dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_landmarks=5)), image_size=SIZE)
    with pytest.raises(ValueError, match="flip_test needs the 68-point markup.*marks 5 points"):
        lgcn_jax.predict(five, np.zeros((1, SIZE, SIZE, 1), np.float32), config=PostprocessConfig(use_shape_model=False, flip_test=True))
    from lgcn_jax.landmarks68 import mirror_heatmaps

    with pytest.raises(ValueError, match="68-point markup, got 5 maps"):
        mirror_heatmaps(np.zeros((1, 8, 8, 5)))


def test_run_eval_flip_test_writes_its_own_report(synthetic_data_dir, tmp_path, capsys):
    import json

    args = ["--checkpoint", "synthetic_quick", "--data_dir", synthetic_data_dir, "--split", "test", "--out", str(tmp_path)]
    assert _eval(args, capsys).returncode == 0
    r = _eval(args + ["--flip_test"], capsys)
    assert r.returncode == 0, r.stderr
    plain, flip = (json.loads((tmp_path / f"eval_test{s}.json").read_text()) for s in ("", "_flip"))
    assert plain["postprocess"]["flip_test"] is False and flip["postprocess"]["flip_test"] is True
    assert flip["decoder"] == "shape_model + flip_test" and (tmp_path / "ced_test_flip.png").exists()
    assert flip["inter_ocular"]["per_image"] != plain["inter_ocular"]["per_image"]


def test_model_with_execution():
    """Model.with_execution runs the same weights another way: bf16 blocks move the synthetic faces' landmarks by a
    fraction of a pixel; the phases layout changes nothing beyond rounding; other fields are refused."""
    model = lgcn_jax.load_pretrained("synthetic_quick")
    images = np.stack([make_face(s, SIZE)[0] for s in (7100, 7101, 7102)])[..., None]
    ref = np.asarray(lgcn_jax.predict(model, images))
    low = model.with_execution(compute_dtype="bfloat16")
    assert low.params.execution.compute_dtype == low.config.execution.compute_dtype == "bfloat16"
    assert low.params.params is model.params.params and model.config.execution.compute_dtype == "float32"
    moved = np.abs(np.asarray(lgcn_jax.predict(low, images)) - ref)
    assert 0 < moved.mean() < 0.3, moved.mean()
    dilated = model.with_execution(dilation_as_phases=False)
    np.testing.assert_allclose(np.asarray(lgcn_jax.predict(dilated, images)), ref, atol=1e-3)
    with pytest.raises(ValueError, match=r"unknown execution settings \['num_filters'\]; they are: blur_batching, blur_features, compute_dtype, dilation_as_phases, fold_batch_norm, fused_batch_norm"):
        model.with_execution(num_filters=64)
    with pytest.raises(ValueError, match="execution.compute_dtype must be 'float32' or 'bfloat16'"):
        model.with_execution(compute_dtype="half")
