"""tf.data input pipeline: deterministic, resumable, augmenting, prefetching to device.

A split is small (300-W train is 3148 faces; 96x96 u8 is 29 MB), so it is held
in memory and example ``g`` of the endless training stream is a pure function
of (seed, g): epoch ``g // N`` permutes the split with a stateless index
shuffle and the augmentation draws from a stateless RNG keyed by ``g``.
Resuming at step s is therefore exact: the stream starts at g = s * batch.
"""

from __future__ import annotations

import collections
import os
from typing import Iterator

import jax
import numpy as np

from lgcn_jax.config import DataConfig

__all__ = ["load_split", "train_dataset", "eval_batches", "prefetch_to_device", "FLIP_PERMUTATION", "DatasetError"]

# Standard 68-point left/right correspondence (0-indexed iBUG markup).
FLIP_PERMUTATION = np.array(
    list(range(16, -1, -1))  # jaw
    + list(range(26, 16, -1))  # brows
    + [27, 28, 29, 30]  # bridge
    + [35, 34, 33, 32, 31]  # nostrils
    + [45, 44, 43, 42, 47, 46]  # left eye <- right eye
    + [39, 38, 37, 36, 41, 40]
    + [54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55]  # outer lip
    + [64, 63, 62, 61, 60, 67, 66, 65]  # inner lip
)


class DatasetError(RuntimeError):
    """A dataset could not be found or read; the message says how to fix it."""


def _tf():
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")  # tf.data only; the accelerator is JAX's
    return tf


def _data_dir(config: DataConfig) -> str:
    return os.path.expanduser(config.data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets"))


_SPLIT_ALIASES = {"synthetic": {"val": "validation"}, "300w": {}}


def load_split(config: DataConfig, split: str) -> dict[str, np.ndarray]:
    """Load a whole split into memory, building the dataset first if needed.

    Returns {"image": u8[N, S, S, 1], "landmarks": f32[N, 68, 2]} (and "file_name" str[N] for 300-W).
    """
    import tensorflow_datasets as tfds

    _tf()
    data_dir = _data_dir(config)
    if config.dataset == "synthetic":
        from data_prep.synthetic_tfds import SyntheticFaces

        builder = SyntheticFaces(data_dir=data_dir)
        if not builder.is_prepared():
            builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    elif config.dataset == "300w":
        try:
            from data_prep.build_300w import Face300W, config_for
        except ImportError as e:  # pragma: no cover - a broken install
            raise DatasetError(f"the 300-W builder is not available in this install: {e}") from e

        # Crops built at this size if there are any, else the 96-pixel build, resized below.
        sized = os.path.isdir(os.path.join(data_dir, Face300W.name, f"crop{config.image_size}"))
        builder = Face300W(data_dir=data_dir, config=config_for(config.image_size) if sized else "crop96")
        if not builder.is_prepared():
            raise DatasetError(
                f"300-W is not built under {data_dir}; run "
                f"`python -m data_prep.build_300w --manual_dir PATH/TO/300W --data_dir {data_dir}` first"
            )
    else:
        raise DatasetError(f"unknown dataset {config.dataset!r}")
    split = _SPLIT_ALIASES.get(config.dataset, {}).get(split, split)
    if split not in builder.info.splits:
        raise DatasetError(
            f"split {split!r} does not exist in {config.dataset} under {data_dir}; available: {sorted(builder.info.splits)}"
        )
    ds = builder.as_dataset(split=split, batch_size=-1, shuffle_files=False)
    arrays = tfds.as_numpy(ds)
    images = arrays["image"]
    landmarks = arrays["landmarks"].astype(np.float32)
    stored = images.shape[1]
    if images.shape[1:3] != (config.image_size, config.image_size):
        images = _resize(images, config.image_size)
        # Pixel centres: continuous coordinate u = x + 0.5 scales with the image.
        landmarks = (landmarks + 0.5) * (config.image_size / stored) - 0.5
    out = {"image": images, "landmarks": landmarks}
    if "file_name" in arrays:  # 300-W: which photo each face came from
        out["file_name"] = np.array([f.decode() if isinstance(f, bytes) else str(f) for f in arrays["file_name"]])
    return out


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    tf = _tf()
    return tf.cast(tf.round(tf.image.resize(images, (size, size), antialias=True)), tf.uint8).numpy()


def _augment(tf, image, landmarks, key, config: DataConfig):
    """Random similarity warp + flip + brightness/contrast of one example (stateless)."""
    size = float(config.image_size)
    u = tf.random.stateless_uniform([7], seed=key, minval=-1.0, maxval=1.0)
    angle = u[0] * np.deg2rad(config.max_rotation_deg)
    scale = 1.0 + u[1] * config.max_scale_delta
    shift = u[2:4] * config.max_shift_frac * size
    flip = tf.logical_and(tf.constant(config.flip), u[4] > 0.0)
    c = (size - 1.0) / 2.0
    cos, sin = tf.cos(angle) * scale, tf.sin(angle) * scale
    # Points: optional mirror x -> size-1-x (with the left/right permutation), then
    # p' = A (p - c) + c + shift with A = scale * rotation(angle).
    lm = tf.stack([tf.where(flip, size - 1.0 - landmarks[:, 0], landmarks[:, 0]), landmarks[:, 1]], axis=-1)
    lm = tf.where(flip, tf.gather(lm, FLIP_PERMUTATION), lm)
    new_x = cos * (lm[:, 0] - c) - sin * (lm[:, 1] - c) + c + shift[0]
    new_y = sin * (lm[:, 0] - c) + cos * (lm[:, 1] - c) + c + shift[1]
    out_lm = tf.stack([new_x, new_y], axis=-1)
    # Image: the sampler wants output -> input, i.e. A^-1 (p' - c - shift) + c, then the mirror.
    det = cos * cos + sin * sin
    i00, i01, i10, i11 = cos / det, sin / det, -sin / det, cos / det
    tx = -(i00 * (c + shift[0]) + i01 * (c + shift[1])) + c
    ty = -(i10 * (c + shift[0]) + i11 * (c + shift[1])) + c
    row0 = tf.where(flip, tf.stack([-i00, -i01, size - 1.0 - tx]), tf.stack([i00, i01, tx]))
    transform = tf.concat([row0, tf.stack([i10, i11, ty]), tf.zeros([2])], axis=0)[None]
    warped = tf.raw_ops.ImageProjectiveTransformV3(
        images=image[None], transforms=transform, output_shape=tf.shape(image)[:2],
        fill_value=0.0, interpolation="BILINEAR", fill_mode="REFLECT",
    )[0]
    lo, hi = config.contrast_range
    contrast = lo + (u[5] + 1.0) / 2.0 * (hi - lo)
    mean = tf.reduce_mean(warped)
    warped = (warped - mean) * contrast + mean + u[6] * config.brightness_delta
    return tf.clip_by_value(warped, 0.0, 1.0), out_lm


def train_dataset(data: dict[str, np.ndarray], config: DataConfig, batch_size: int, seed: int, start_step: int = 0):
    """Endless batches {"image": f32[B,S,S,1] in [0,1], "landmarks": f32[B,68,2]} from step ``start_step``."""
    tf = _tf()
    images = tf.constant(data["image"])
    landmarks = tf.constant(data["landmarks"])
    n = int(images.shape[0])
    if n == 0:
        raise DatasetError("the training split is empty")

    def make(g):
        epoch, i = g // n, g % n
        j = tf.random.experimental.index_shuffle(i, seed=tf.stack([tf.constant(seed, tf.int64), epoch]), max_index=n - 1)
        image = tf.cast(images[j], tf.float32) / 255.0
        lm = landmarks[j]
        if config.augment:
            image, lm = _augment(tf, image, lm, tf.stack([tf.constant(seed, tf.int64), g]), config)
        return {"image": image, "landmarks": lm}

    ds = tf.data.Dataset.range(start_step * batch_size, 2**62)
    ds = ds.map(make, num_parallel_calls=config.num_parallel_calls, deterministic=True)
    ds = ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.deterministic = True
    return ds.with_options(options)


def eval_batches(data: dict[str, np.ndarray], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """The whole split in order, last batch padded; "valid" f32[B] marks real examples."""
    n = len(data["image"])
    for lo in range(0, n, batch_size):
        hi = min(n, lo + batch_size)
        pad = batch_size - (hi - lo)
        image = data["image"][lo:hi].astype(np.float32) / 255.0
        lm = data["landmarks"][lo:hi]
        valid = np.ones(hi - lo, np.float32)
        if pad:
            image = np.concatenate([image, np.repeat(image[-1:], pad, 0)])
            lm = np.concatenate([lm, np.repeat(lm[-1:], pad, 0)])
            valid = np.concatenate([valid, np.zeros(pad, np.float32)])
        yield {"image": image, "landmarks": lm, "valid": valid}


def prefetch_to_device(iterator, size: int = 2):
    """Keep ``size`` batches on the device ahead of the consumer, so the step never waits on a copy."""
    queue = collections.deque()

    def enqueue(n):
        for _ in range(n):
            try:
                batch = next(iterator)
            except StopIteration:
                return
            queue.append(jax.tree_util.tree_map(jax.device_put, batch))

    enqueue(size)
    while queue:
        yield queue.popleft()
        enqueue(1)
