import numpy as np
import pytest

import jax.numpy as jnp

from data_prep.synthetic_faces import make_face, make_split
from lgcn_jax import augment
from lgcn_jax import datasets
from lgcn_jax import input_pipeline as ip
from lgcn_jax.config import DataConfig
from lgcn_jax.landmarks68 import FLIP_PERMUTATION


def _augmented(stream, cfg, seed):
    """The next batch of a raw training stream as the training step sees it: augmented on the device."""
    batch = next(stream)
    image, lm = augment.augment_batch(batch["image"], batch["landmarks"], jnp.asarray(batch["example"]), seed, cfg)
    return {"image": np.asarray(image), "landmarks": np.asarray(lm)}


def test_faces_are_deterministic_and_varied():
    a, la = make_face(5)
    b, lb = make_face(5)
    c, lc = make_face(6)
    assert a.shape == (96, 96) and a.dtype == np.uint8 and la.shape == (68, 2) and la.dtype == np.float32
    assert np.array_equal(a, b) and np.array_equal(la, lb)
    assert not np.array_equal(la, lc)
    _, lms = make_split("validation", 20)
    assert np.mean((lms >= 0) & (lms <= 95)) > 0.97  # faces sit inside the crop
    iod = np.linalg.norm(lms[:, 36] - lms[:, 45], axis=-1)
    assert 15 < iod.min() and iod.max() < 60


def test_flip_permutation():
    p = FLIP_PERMUTATION
    assert sorted(p) == list(range(68))
    assert np.array_equal(p[p], np.arange(68))  # flip twice = identity
    assert p[36] == 45 and p[39] == 42 and p[48] == 54 and p[0] == 16 and p[30] == 30


def _dot_image(points, size=96):
    img = np.zeros((size, size), np.uint8)
    for x, y in np.round(points).astype(int):
        img[max(0, y - 1): y + 2, max(0, x - 1): x + 2] = 255
    return img


def test_augmentation_moves_points_with_content():
    """Warp an image of bright dots at the landmarks: dots must land on the warped landmarks."""
    rng = np.random.default_rng(0)
    lm = rng.uniform(25, 70, (68, 2)).astype(np.float32)
    lm[:, 0] = np.linspace(20, 75, 68)  # distinct columns so the flip is visible
    data = {"image": _dot_image(lm)[None, ..., None].repeat(4, 0), "landmarks": np.repeat(lm[None], 4, 0)}
    cfg = DataConfig(brightness_delta=0.0, contrast_range=(1.0, 1.0), max_rotation_deg=20, max_scale_delta=0.1, max_shift_frac=0.05)
    batch = _augmented(ip.tf_batches(data, 4, seed=3), cfg, 3)
    flipped = 0
    for img, pts in zip(batch["image"][..., 0], batch["landmarks"]):
        ys, xs = np.nonzero(img > 0.3)
        bright = np.stack([xs, ys], -1)
        d = np.linalg.norm(pts[:, None] - bright[None], axis=-1).min(1)
        inside = np.all((pts > 2) & (pts < 93), axis=-1)
        assert np.median(d[inside]) < 1.0 and np.max(d[inside]) < 2.0
        flipped += pts[0, 0] > pts[16, 0]  # after a flip point 0 is the image-left jaw again
    assert flipped == 0  # the permutation keeps 0 on the left: x-order of 0..16 stays increasing


def test_flip_branch_swaps_eyes():
    """Force a flip: the left eye (36) of the output must be the mirrored right eye (45) of the input."""
    lm = np.tile(np.array([[30.0, 40.0]], np.float32), (68, 1))
    lm[45] = [70.0, 40.0]
    lm[36] = [25.0, 40.0]
    data = {"image": np.zeros((1, 96, 96, 1), np.uint8), "landmarks": lm[None]}
    cfg = DataConfig(max_rotation_deg=0, max_scale_delta=0, max_shift_frac=0, brightness_delta=0, contrast_range=(1, 1))
    found = False
    for seed in range(20):
        out = _augmented(ip.array_batches(data, 1, seed=seed), cfg, seed)["landmarks"][0]
        if not np.allclose(out, lm):
            np.testing.assert_allclose(out[36], [95 - 70.0, 40.0], atol=1e-4)
            np.testing.assert_allclose(out[45], [95 - 25.0, 40.0], atol=1e-4)
            found = True
            break
    assert found


@pytest.mark.parametrize("stream", [ip.tf_batches, ip.array_batches])
def test_stream_deterministic_and_resumable(stream):
    """Both streams: the same seed gives the same raw batches, a start step the rest of them, each epoch every
    face once, and the example indices that key the augmentation count up."""
    images, lms = make_split("validation", 10, image_size=32)
    data = {"image": images[..., None], "landmarks": lms}

    def take(n, **kw):
        it = stream(data, 4, **kw)
        return [next(it) for _ in range(n)]

    full, again = take(6, seed=1), take(6, seed=1)
    resumed, other = take(2, seed=1, start_step=4), take(1, seed=2)
    for a, b in zip(full, again):
        assert all(np.array_equal(a[k], b[k]) for k in a)
    for a, b in zip(full[4:], resumed):
        assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(full[0]["landmarks"], other[0]["landmarks"])
    assert full[0]["image"].dtype == np.uint8 and np.concatenate([b["example"] for b in full]).tolist() == list(range(24))
    first_epoch = np.concatenate([b["landmarks"] for b in full])[:10]
    assert sorted(map(tuple, first_epoch[:, 0])) == sorted(map(tuple, lms[:, 0]))


def test_tfds_builder_and_splits(synthetic_data_dir):
    cfg = DataConfig(data_dir=synthetic_data_dir)
    train = datasets.load_split(cfg, "train")
    val = datasets.load_split(cfg, "val")
    assert train["image"].shape == (48, 96, 96, 1) and val["landmarks"].shape == (16, 68, 2)
    # TFDS stores examples in a hashed order; every one must be reproducible from its seed 0..47.
    faces = [make_face(i) for i in range(48)]
    matched = {i for j in range(48) for i, (image, lm) in enumerate(faces)
               if np.array_equal(train["image"][j, ..., 0], image) and np.allclose(train["landmarks"][j], lm)}
    assert matched == set(range(48))
    small = datasets.load_split(DataConfig(data_dir=synthetic_data_dir, image_size=48), "train")
    assert small["image"].shape == (48, 48, 48, 1)
    np.testing.assert_allclose(small["landmarks"], (train["landmarks"] + 0.5) / 2 - 0.5, atol=1e-5)
    with pytest.raises(datasets.DatasetError, match="split 'challenging' does not exist"):
        datasets.load_split(cfg, "challenging")


def test_eval_batches_pad_and_mark():
    data = {"image": np.zeros((5, 8, 8, 1), np.uint8), "landmarks": np.zeros((5, 68, 2), np.float32)}
    batches = list(ip.eval_batches(data, 4))
    assert [b["image"].shape[0] for b in batches] == [4, 4]
    assert batches[1]["valid"].tolist() == [1, 0, 0, 0]
