"""The TF-free path: array exports, the on-device jnp augmentation behind both streams, training without TensorFlow."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lgcn_jax
from data_prep.export_arrays import export_arrays
from data_prep.synthetic_faces import make_face
from lgcn_jax import augment as aug
from lgcn_jax import datasets
from lgcn_jax import input_pipeline as ip
from lgcn_jax.config import DataConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _face(size=96):
    image, lm = make_face(3, size)
    return image[..., None], lm


def _summaries(images, lms):
    """Per-example numbers that pin the change down: centroid, eye-line angle and length, nose side, brightness."""
    eye = lms[:, 45] - lms[:, 36]
    mid = (lms[:, 36] + lms[:, 45]) / 2
    return {
        "cx": lms[..., 0].mean(1), "cy": lms[..., 1].mean(1),
        "angle": np.arctan2(eye[:, 1], eye[:, 0]), "length": np.linalg.norm(eye, axis=-1),
        "nose_side": np.sign((lms[:, 30] - mid) @ np.array([1.0, 0.0]) * 1.0 - 0.0),
        "brightness": images.reshape(len(images), -1).mean(1), "spread": images.reshape(len(images), -1).std(1),
    }


def test_tf_and_jax_pipelines_draw_from_the_same_distribution():
    """One asymmetric face, 600 draws from each stream as the training step augments them: every summary passes a
    two-sample KS test (the streams' permutations and example keys differ, the change applied does not)."""
    from scipy.stats import ks_2samp

    image, lm = _face()
    lm = lm.copy()
    lm[30, 0] += 6.0  # nose off-centre: a mirror flips its side
    data = {"image": image[None], "landmarks": lm[None]}
    cfg = DataConfig()
    n, b = 600, 50
    tf_step = jax.jit(lambda im, l, e: aug.augment_batch(im, l, e, 0, cfg))
    tf_stream = ip.tf_batches(data, b, seed=0)
    tx = [tf_step(x["image"], x["landmarks"], x["example"]) for x in (next(tf_stream) for _ in range(n // b))]
    tf_img, tf_lm = (np.concatenate([np.asarray(v[i]) for v in tx]) for i in (0, 1))
    step = jax.jit(lambda im, l, e: aug.augment_batch(im, l, e, 7, cfg))
    stream = ip.array_batches(data, b, seed=7)
    jx = [step(x["image"], x["landmarks"], x["example"]) for x in (next(stream) for _ in range(n // b))]
    jx_img, jx_lm = (np.concatenate([np.asarray(v[i]) for v in jx]) for i in (0, 1))
    a, c = _summaries(tf_img, tf_lm), _summaries(jx_img, jx_lm)
    for key in a:
        p = ks_2samp(a[key], c[key]).pvalue
        assert p > 1e-3, (key, p)
    assert 0.4 < np.mean(c["nose_side"] > 0) < 0.6  # about half mirrored
    # And a wrong range is caught: half the rotation range is a different distribution.
    narrow = jax.jit(lambda im, l, e: aug.augment_batch(im, l, e, 7, DataConfig(max_rotation_deg=7.5)))
    stream = ip.array_batches(data, b, seed=7)
    nx = [narrow(x["image"], x["landmarks"], x["example"]) for x in (next(stream) for _ in range(n // b))]
    assert ks_2samp(a["angle"], _summaries(np.concatenate([np.asarray(v[0]) for v in nx]),
                                           np.concatenate([np.asarray(v[1]) for v in nx]))["angle"]).pvalue < 1e-3


def test_array_batches_permute_each_epoch_and_resume_exactly():
    n = 10
    data = {"image": np.arange(n, dtype=np.uint8).reshape(n, 1, 1, 1).repeat(4, 1).repeat(4, 2), "landmarks": np.zeros((n, 68, 2), np.float32)}
    stream = ip.array_batches(data, 4, seed=3)
    batches = [next(stream) for _ in range(10)]  # 40 examples = 4 epochs
    ids = np.concatenate([b["image"][:, 0, 0, 0] for b in batches])
    for e in range(4):
        assert sorted(ids[e * n:(e + 1) * n]) == list(range(n))
    assert not np.array_equal(ids[:n], ids[n:2 * n])
    assert np.concatenate([b["example"] for b in batches]).tolist() == list(range(40))
    resumed = ip.array_batches(data, 4, seed=3, start_step=6)
    for b in batches[6:]:
        r = next(resumed)
        assert all(np.array_equal(r[k], b[k]) for k in b)


def test_augment_batch_is_a_function_of_seed_and_example():
    image, lm = _face(32)
    images, lms = np.repeat(image[None], 3, 0), np.repeat(lm[None] / 3, 3, 0)
    cfg = DataConfig(image_size=32)
    a = aug.augment_batch(images, lms, jnp.array([5, 6, 7]), 0, cfg)
    b = aug.augment_batch(images[:1], lms[:1], jnp.array([6]), 0, cfg)
    np.testing.assert_allclose(np.asarray(a[1][1]), np.asarray(b[1][0]), atol=1e-5)
    assert not np.allclose(np.asarray(a[1][0]), np.asarray(a[1][1]))
    off = aug.augment_batch(images, lms, jnp.array([5, 6, 7]), 0, DataConfig(image_size=32, augment=False))
    np.testing.assert_array_equal(np.asarray(off[1]), lms)
    np.testing.assert_allclose(np.asarray(off[0]), images / 255.0)
    with pytest.raises(ValueError, match="68-point"):
        aug.augment_batch(images, lms[:, :5], jnp.array([5, 6, 7]), 0, cfg)


@pytest.fixture(scope="module")
def synthetic_export(synthetic_data_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("export"))
    export_arrays(DataConfig(data_dir=synthetic_data_dir), out)
    return out


def test_export_round_trip_and_refusals(synthetic_data_dir, synthetic_export, tmp_path):
    for split in ("train", "validation"):
        a = datasets.load_split(DataConfig(data_dir=synthetic_data_dir), split)
        b = datasets.load_split(DataConfig(data_dir=synthetic_export), split)
        assert all(np.array_equal(a[k], b[k]) for k in a)
    small = datasets.load_split(DataConfig(data_dir=synthetic_export, image_size=48), "train")
    assert small["image"].shape[1:] == (48, 48, 1)
    with pytest.raises(datasets.DatasetError, match=r"is not empty: it holds an export \(lgcn_arrays.json\)"):
        export_arrays(DataConfig(data_dir=synthetic_data_dir), synthetic_export)
    with pytest.raises(datasets.DatasetError, match="export of dataset 'synthetic', but data.dataset is '300w'"):
        datasets.load_split(DataConfig(dataset="300w", data_dir=synthetic_export), "train")
    # A truncated array file names itself.
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in os.listdir(synthetic_export):
        data = open(os.path.join(synthetic_export, f), "rb").read()
        (copy / f).write_bytes(data[: len(data) // 2] if f == "train.npz" else data)
    with pytest.raises(datasets.DatasetError, match=r"train\.npz is truncated or corrupt"):
        datasets.load_split(DataConfig(data_dir=str(copy)), "train")


def test_absent_300w_split_says_how_to_add_it(tmp_path):
    export = tmp_path / "e"
    export.mkdir()
    np.savez(export / "common.npz", image=np.zeros((2, 8, 8, 1), np.uint8), landmarks=np.zeros((2, 68, 2), np.float32))
    (export / datasets.ARRAYS_META).write_text(json.dumps({"format": 1, "dataset": "300w", "splits": {"common": {"file": "common.npz", "num_examples": 2}}}))
    with pytest.raises(datasets.DatasetError, match=r"'challenging' is not in the build.*it needs ibug.*build_300w --manual_dir"):
        datasets.load_split(DataConfig(dataset="300w", data_dir=str(export), image_size=8), "challenging")


def test_holdout_keeps_photos_whole_and_is_stable():
    names = ([f"afw/{p}_{k}.jpg" for p in range(100, 130) for k in (1, 2, 3)]
             + [f"helen/trainset/{p}_1.jpg" for p in range(300)] + [f"lfpw/trainset/image_{i:04d}.jpg" for i in range(1, 201)])
    n = len(names)
    data = {"image": np.arange(n).reshape(n, 1, 1, 1), "landmarks": np.zeros((n, 68, 2), np.float32), "file_name": np.array(names)}
    train, val = datasets.holdout(data, 59)
    assert len(train["image"]) + len(val["image"]) == n and 59 <= len(val["image"]) <= 65
    assert not set(map(datasets.photo_id, train["file_name"])) & set(map(datasets.photo_id, val["file_name"]))
    folders = [f.split("/")[0] for f in val["file_name"]]
    # 10% of each subset (90, 300 and 200 faces); AFW photos hold 3 faces, so it may overshoot by 2.
    assert 9 <= folders.count("afw") <= 11 and folders.count("helen") == 30 and folders.count("lfpw") == 20
    assert datasets.photo_id("lfpw/trainset/image_0046.jpg") == "lfpw/trainset/image_0046"
    assert datasets.photo_id("afw/4538917191_16.jpg") == "afw/4538917191"
    # The same faces on every call and whatever the order of the rows.
    perm = np.random.default_rng(0).permutation(n)
    _, val2 = datasets.holdout({k: v[perm] for k, v in data.items()}, 59)
    assert sorted(val2["file_name"]) == sorted(val["file_name"])


def test_training_runs_without_tensorflow(synthetic_export, tmp_path):
    """run_train.py with TensorFlow made unimportable: the jax pipeline, JSONL metrics, checkpoints."""
    workdir = str(tmp_path / "ckpt")
    overrides = ["model.num_filters=8", "model.local_5x5_layers=1", "model.local_3x3_layers=1", "model.global_layers=1",
                 "model.global_dilation=2", "model.kernel_size=15", "model.dropout_rate=0"]
    overrides += ["model.kernel_sigmas=0.75,2.0,4.0", "data.image_size=32", "train.batch_size=4", "train.num_steps=4", "train.eval_every=2",
                  "train.checkpoint_every=2", "train.log_every=1", "train.bn_recalibration_batches=2", "train.optimizer=adam",
                  "train.learning_rate=1e-3", "train.lr_decay_steps=()", "train.lr_decay_factors=()"]
    code = ("import sys; sys.modules['tensorflow'] = None; sys.modules['tensorflow_datasets'] = None; import run_train; "
            f"rc = run_train.main(['--workdir', {workdir!r}, '--data_dir', {synthetic_export!r}, '--no_progress', '--config', *{overrides!r}]); "
            "assert not any(m.startswith('tensorflow') and sys.modules[m] is not None for m in sys.modules), 'TF was imported'; sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "jax input pipeline" in r.stderr
    from lgcn_jax.metric_writer import read_metrics

    records = read_metrics(workdir)
    assert [x["step"] for x in records if "train/loss" in x] == [1, 2, 3, 4]
    assert [x["step"] for x in records if "val/nme" in x] == [0, 2, 4]
    assert all(np.isfinite(x["train/loss"]) for x in records if "train/loss" in x)
    assert os.listdir(os.path.join(workdir, "tb")), "TensorBoard events are written without TensorFlow too"
    assert sorted(os.listdir(os.path.join(workdir, "last"))) == ["2", "4"]
    from lgcn_jax.evaluation import plot_training

    png = plot_training(workdir, str(tmp_path / "curve.png"))
    assert open(png, "rb").read()[:8] == b"\x89PNG\r\n\x1a\n"


def test_metric_writer_keeps_every_number_once_across_resumes(tmp_path):
    from lgcn_jax.metric_writer import MetricWriter, read_metrics

    w = MetricWriter(str(tmp_path))
    for step in range(1, 6):
        w.write(step, {"train/loss": 1.0 / step})
    w.write(6, {"train/loss": float("nan")})
    w.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "train/lo')  # a run killed mid-line
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [1, 2, 3, 4, 5, 6]
    assert read_metrics(str(tmp_path))[-1]["train/loss"] == "nan"
    w = MetricWriter(str(tmp_path), start_step=3)  # resumed from the checkpoint of step 3
    w.write(4, {"train/loss": 0.3})
    w.close()
    records = read_metrics(str(tmp_path))
    assert [r["step"] for r in records] == [1, 2, 3, 4] and records[-1]["train/loss"] == 0.3
    # The lines of the steps trained again are kept aside, not lost.
    assert [r["step"] for r in read_metrics(str(tmp_path), "metrics.dropped.jsonl")] == [4, 5, 6]
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

    events = [e for f in sorted(os.listdir(tmp_path / "tb")) for e in LegacyEventFileLoader(str(tmp_path / "tb" / f)).Load()]
    scalars = [(e.step, v.tag, v.simple_value) for e in events for v in e.summary.value]
    assert (4, "train/loss", pytest.approx(0.3)) in scalars and (2, "train/loss", pytest.approx(0.5)) in scalars


def test_teacher_maps_move_with_the_points():
    """augment_batch with per-landmark maps: maps rendered at the landmarks, changed with the crop (warp and mirror
    with its permutation), are the maps rendered at the changed landmarks (bilinear resampling of smooth maps)."""
    from lgcn_jax.heatmaps import render_targets
    from lgcn_jax.network import model_kernel

    image, lm = _face(32)
    cfg = DataConfig(image_size=32, max_rotation_deg=15, max_scale_delta=0.1, max_shift_frac=0.05)
    # Wide peaks, so that bilinear resampling (a fraction of a pixel off the grid) keeps their shape.
    kernel = model_kernel(lgcn_jax.ModelConfig(kernel_size=21, kernel_weights=(1.0,), kernel_sigmas=(3.0,)))
    maps, _ = render_targets(jnp.asarray(lm[None]), 32, 32, kernel)
    examples = jnp.arange(8)
    images, lms = np.repeat(image[None], 8, 0), np.repeat(lm[None], 8, 0)
    _, moved_lm, moved = aug.augment_batch(images, lms, examples, 0, cfg, jnp.repeat(maps, 8, 0))
    want, _ = render_targets(moved_lm, 32, 32, kernel)
    inside = np.all((np.asarray(moved_lm) > 8) & (np.asarray(moved_lm) < 23), axis=-1)  # away from the zero border
    err = np.abs(np.asarray(moved) - np.asarray(want)).max(axis=(1, 2))[inside]
    assert inside.sum() > 100 and err.max() < 0.1 * float(np.asarray(want).max()), err.max()  # the scale change: ~10% wider or narrower
    flips = np.asarray(moved_lm)[:, 36, 0] > np.asarray(moved_lm)[:, 45, 0]
    assert not flips.any()  # mirrored crops keep point 36 on the image's left: the maps were reordered with them
    two = aug.augment_batch(images, lms, examples, 0, cfg)
    np.testing.assert_array_equal(np.asarray(two[1]), np.asarray(moved_lm))  # the maps change nothing else
