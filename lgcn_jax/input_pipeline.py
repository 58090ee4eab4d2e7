"""Input: splits in memory from a TFDS build or a TF-free array export, and two training streams.

A split is small (300-W train is 3148 faces; 96x96 u8 is 29 MB), so it is held
in memory and example ``g`` of the endless training stream is a pure function
of (seed, g).  Resuming at step s is therefore exact: the stream starts at
g = s * batch.  Two streams, chosen by ``data.pipeline``:

* ``tf``: tf.data permutes each epoch with a stateless index shuffle and
  augments on the CPU with a stateless RNG keyed by ``g`` (``train_dataset``).
* ``jax``: NumPy permutes each epoch and yields raw u8 batches with their
  example indices; ``lgcn_jax.augment`` changes them on the device inside the
  jit-compiled step (``array_batches``).  Needs no TensorFlow.

Both apply the same change for the same seven numbers (tests check it); the
examples each draws differ, their distribution does not.  ``auto`` takes tf.data
where TensorFlow is installed.

Splits come from a TFDS data dir, or from a folder written by
``python -m data_prep.export_arrays`` (one ``SPLIT.npz`` per split and
``lgcn_arrays.json``), which needs only NumPy to read: pass either as ``data.data_dir``.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import os
import re
import zipfile
import zlib
from typing import Iterator

import jax
import numpy as np

from lgcn_jax.config import DataConfig
from lgcn_jax.landmarks68 import FLIP_PERMUTATION
from lgcn_jax.sharding import pad_rows

__all__ = ["load_split", "available_splits", "holdout", "train_dataset", "array_batches", "eval_batches", "prefetch_to_device",
           "resolve_pipeline", "export_arrays", "ARRAYS_META", "FLIP_PERMUTATION", "DatasetError"]

ARRAYS_META = "lgcn_arrays.json"
ARRAYS_FORMAT = 1


class DatasetError(RuntimeError):
    """A dataset could not be found or read; the message says how to fix it."""


def _tf():
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")  # tf.data only; the accelerator is JAX's
    return tf


def has_tensorflow() -> bool:
    return importlib.util.find_spec("tensorflow") is not None and importlib.util.find_spec("tensorflow_datasets") is not None


def resolve_pipeline(config: DataConfig) -> str:
    """"tf" or "jax": the training stream ``config.pipeline`` asks for ("auto": tf.data where TensorFlow is installed)."""
    if config.pipeline == "auto":
        return "tf" if has_tensorflow() else "jax"
    if config.pipeline == "tf" and not has_tensorflow():
        raise DatasetError("data.pipeline=tf needs tensorflow and tensorflow-datasets; install them or use data.pipeline=jax (or auto)")
    return config.pipeline


def _data_dir(config: DataConfig) -> str:
    """The data folder of ``config``; an error naming it when it cannot hold 300-W (synthetic data is built there)."""
    data_dir = os.path.expanduser(config.data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets"))
    if os.path.exists(data_dir) and not os.path.isdir(data_dir):
        raise DatasetError(f"data dir {data_dir} is a file; data.data_dir (--data_dir) takes a folder: a TFDS data dir or an array export")
    if config.dataset == "300w" and not os.path.isdir(data_dir):
        raise DatasetError(f"data dir {data_dir} does not exist; pass the folder that holds the 300-W build or export (--data_dir, "
                           f"data.data_dir; a workdir keeps the one it was trained with in config.json), or build it with "
                           f"`python -m data_prep.build_300w --manual_dir PATH/TO/300W --data_dir {data_dir}`")
    return data_dir


def _is_export(data_dir: str) -> bool:
    """Whether ``data_dir`` is an array export (``data_prep.export_arrays``) rather than a TFDS data dir."""
    return os.path.exists(os.path.join(data_dir, ARRAYS_META))


_SPLIT_ALIASES = {"synthetic": {"val": "validation"}, "300w": {}}


def load_split(config: DataConfig, split: str) -> dict[str, np.ndarray]:
    """Load a whole split into memory (from an array export, or TFDS, building synthetic data if needed).

    Returns {"image": u8[N, S, S, 1], "landmarks": f32[N, 68, 2]} (and "file_name" str[N] for 300-W),
    resized to ``config.image_size`` if stored at another size.
    """
    data_dir = _data_dir(config)
    split = _SPLIT_ALIASES.get(config.dataset, {}).get(split, split)
    if _is_export(data_dir):
        out = _load_exported(data_dir, config, split)
    else:
        out = _load_tfds(data_dir, config, split)
    stored = out["image"].shape[1]
    if out["image"].shape[1:3] != (config.image_size, config.image_size):
        out["image"] = _resize(out["image"], config.image_size)
        # Pixel centres: continuous coordinate u = x + 0.5 scales with the image.
        out["landmarks"] = (out["landmarks"] + 0.5) * (config.image_size / stored) - 0.5
    return out


def _absent_split(split: str, config: DataConfig, data_dir: str, available) -> DatasetError:
    if config.dataset == "300w":
        from data_prep.layout_300w import SUBSETS, absent_split_message

        exported = _is_export(data_dir)
        return DatasetError(absent_split_message(split, data_dir) + f" (this {'export' if exported else 'build'} has: {', '.join(sorted(available))})"
                            + ("; then export it again with `python -m data_prep.export_arrays`" if exported and split in SUBSETS else ""))
    return DatasetError(f"split {split!r} does not exist in {config.dataset} under {data_dir}; available: {sorted(available)}")


def _tfds_builder(data_dir: str, config: DataConfig):
    if not has_tensorflow():
        raise DatasetError(
            f"{data_dir} holds no array export ({ARRAYS_META}) and TensorFlow is not installed to read a TFDS build; "
            "export the splits on a machine with TensorFlow: `python -m data_prep.export_arrays --dataset "
            f"{config.dataset} --data_dir TFDS_DIR --out DIR`, then pass --data_dir DIR"
        )
    import tensorflow_datasets as tfds

    _tf()
    if config.dataset == "synthetic":
        from data_prep.synthetic_tfds import SyntheticFaces

        builder = SyntheticFaces(data_dir=data_dir)
        if not builder.is_prepared():
            builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
        return builder
    if config.dataset == "300w":
        from data_prep.build_300w import Face300W, config_for

        # Crops built at this size if there are any, else the 96-pixel build, resized by load_split.
        sized = os.path.isdir(os.path.join(data_dir, Face300W.name, f"crop{config.image_size}"))
        builder = Face300W(data_dir=data_dir, config=config_for(config.image_size) if sized else "crop96")
        if not builder.is_prepared():
            raise DatasetError(
                f"300-W is not built under {data_dir}; run "
                f"`python -m data_prep.build_300w --manual_dir PATH/TO/300W --data_dir {data_dir}` first"
            )
        return builder
    raise DatasetError(f"unknown dataset {config.dataset!r}")


def _load_tfds(data_dir: str, config: DataConfig, split: str) -> dict[str, np.ndarray]:
    builder = _tfds_builder(data_dir, config)  # first: without TensorFlow it says what to do instead
    import tensorflow_datasets as tfds

    if split not in builder.info.splits:
        raise _absent_split(split, config, data_dir, builder.info.splits)
    arrays = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1, shuffle_files=False))
    out = {"image": arrays["image"], "landmarks": arrays["landmarks"].astype(np.float32)}
    if "file_name" in arrays:  # 300-W: which photo each face came from
        out["file_name"] = np.array([f.decode() if isinstance(f, bytes) else str(f) for f in arrays["file_name"]])
    return out


def available_splits(config: DataConfig) -> list[str]:
    """The splits that ``config.data_dir`` holds for ``config.dataset``."""
    data_dir = _data_dir(config)
    if _is_export(data_dir):
        return sorted(_read_meta(data_dir, config)["splits"])
    return sorted(_tfds_builder(data_dir, config).info.splits)


def _read_meta(data_dir: str, config: DataConfig) -> dict:
    path = os.path.join(data_dir, ARRAYS_META)
    try:
        with open(path) as f:
            meta = json.load(f)
        fmt, dataset, splits = meta["format"], meta["dataset"], meta["splits"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DatasetError(f"{path} is not a readable lgcn_jax array export ({type(e).__name__}: {e}); export it again") from e
    if fmt != ARRAYS_FORMAT:
        raise DatasetError(f"{path} has export format {fmt}; this lgcn_jax reads format {ARRAYS_FORMAT}: export it again")
    if dataset != config.dataset:
        raise DatasetError(f"{data_dir} is an export of dataset {dataset!r}, but data.dataset is {config.dataset!r}; "
                           f"pass --dataset {dataset} or the export of {config.dataset!r}")
    return meta


def _load_exported(data_dir: str, config: DataConfig, split: str) -> dict[str, np.ndarray]:
    meta = _read_meta(data_dir, config)
    if split not in meta["splits"]:
        raise _absent_split(split, config, data_dir, meta["splits"])
    entry = meta["splits"][split]
    path = os.path.join(data_dir, entry["file"])
    try:
        with np.load(path, allow_pickle=False) as z:
            out = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DatasetError(f"{path} is truncated or corrupt ({type(e).__name__}: {e}); copy or export it again") from e
    n = entry["num_examples"]
    image, landmarks = out.get("image"), out.get("landmarks")
    if image is None or landmarks is None or len(image) != n or len(landmarks) != n or image.dtype != np.uint8 or image.ndim != 4:
        got = {k: (v.shape, str(v.dtype)) for k, v in out.items()}
        raise DatasetError(f"{path} does not hold the {n} examples {ARRAYS_META} lists (found {got}); copy or export it again")
    out["landmarks"] = landmarks.astype(np.float32)
    # Every face's points lie in or near its crop (the builders frame the landmark box with a margin).
    side = image.shape[1]
    bad = ~np.all(np.isfinite(landmarks) & (np.abs(landmarks - side / 2.0) <= side), axis=(1, 2))
    if bad.any():
        raise DatasetError(f"{path}: the landmarks of {int(bad.sum())} faces (first: example {int(np.argmax(bad))}) are not finite or lie "
                           f"far outside their {side}x{side} crop; the file was changed after export: copy or export it again")
    return out


def export_arrays(config: DataConfig, out_dir: str, splits=None, overwrite: bool = False) -> dict:
    """Write the splits of a TFDS build as ``SPLIT.npz`` + ``lgcn_arrays.json`` under ``out_dir`` (needs TensorFlow).

    Images keep the build's size (resized when loaded).  Refuses to replace an existing export unless ``overwrite``.
    Returns the metadata written.
    """
    data_dir = _data_dir(config)
    if _is_export(data_dir):
        raise DatasetError(f"{data_dir} is already an array export; export_arrays reads a TFDS build (the --data_dir of build_300w)")
    available = available_splits(config)
    names = list(splits) if splits else available
    for name in names:
        if name not in available:
            raise _absent_split(name, config, data_dir, available)
    meta_path = os.path.join(out_dir, ARRAYS_META)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise DatasetError(f"--out {out_dir} is a file; name a folder")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        what = f"an export ({ARRAYS_META})" if os.path.exists(meta_path) else f"other files ({', '.join(sorted(os.listdir(out_dir))[:3])})"
        raise DatasetError(f"{out_dir} is not empty: it holds {what}; nothing was written. Pass overwrite=True (--overwrite) or an empty folder")
    os.makedirs(out_dir, exist_ok=True)
    meta = {"format": ARRAYS_FORMAT, "dataset": config.dataset, "source": os.path.abspath(data_dir), "splits": {}}
    for name in names:
        arrays = _load_tfds(data_dir, config, name)
        file = f"{name}.npz"
        tmp = os.path.join(out_dir, f".{name}.tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, os.path.join(out_dir, file))
        meta["splits"][name] = {"file": file, "num_examples": int(len(arrays["image"])), "image_size": int(arrays["image"].shape[1])}
    tmp = meta_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(tmp, meta_path)
    return meta


def photo_id(file_name: str) -> str:
    """The photo a face came from: 'afw/4538917191_16.jpg' -> 'afw/4538917191'.

    300-W numbers the faces of a photo _1, _2, ... (no leading zero); LFPW's zero-padded
    'image_0046' is a photo, not a face index, and is kept whole.
    """
    return re.sub(r"_[1-9]\d?$", "", os.path.splitext(file_name)[0])


def holdout(data: dict[str, np.ndarray], num_faces: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Split a training split into (train, validation) with at least ``num_faces`` validation faces.

    Whole photos go to one side (faces of one photo share its person and lighting), each
    subset folder contributes in proportion to its size, and photos are chosen by a CRC32
    of their name, so the split is the same on every machine and for any order of the
    rows.  Needs "file_name"; order within each part is kept.
    """
    n = len(data["image"])
    if num_faces <= 0:
        return data, {k: v[:0] for k, v in data.items()}
    if "file_name" not in data:
        raise DatasetError("a validation holdout needs the file names of the training faces (a 300-W build has them)")
    if num_faces >= n:
        raise DatasetError(f"data.validation_faces={num_faces} leaves no training faces of {n}; lower it")
    photos = np.array([photo_id(f) for f in data["file_name"]])
    folders = np.array([os.path.dirname(p) for p in photos])
    counts = collections.Counter(photos)
    chosen = set()
    for folder in sorted(set(folders)):  # each subset (AFW, HELEN, LFPW) in proportion to its size
        quota = max(1, round(num_faces * np.count_nonzero(folders == folder) / n))  # whole photos until it is reached
        count = 0
        for p in sorted(set(photos[folders == folder]), key=lambda p: (zlib.crc32(p.encode()), p)):
            if count >= quota:
                break
            chosen.add(p)
            count += counts[p]
    val = np.array([p in chosen for p in photos])
    if val.all():
        raise DatasetError(f"data.validation_faces={num_faces} leaves no training faces of {n}; lower it")
    return {k: v[~val] for k, v in data.items()}, {k: v[val] for k, v in data.items()}


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    """u8[N, S, S, 1] -> u8[N, size, size, 1], antialiased bilinear (TensorFlow's ``resize(antialias=True)``)."""
    out = jax.image.resize(np.asarray(images, np.float32), (len(images), size, size, images.shape[-1]), "linear", antialias=True)
    return np.asarray(jax.numpy.clip(jax.numpy.round(out), 0, 255)).astype(np.uint8)


def _augment(tf, image, landmarks, key, config: DataConfig):
    """Random similarity warp + flip + brightness/contrast of one example (stateless)."""
    return _augment_with(tf, image, landmarks, tf.random.stateless_uniform([7], seed=key, minval=-1.0, maxval=1.0), config)


def _augment_with(tf, image, landmarks, u, config: DataConfig):
    """The change ``u`` f32[7] of ``lgcn_jax.augment`` in TensorFlow ops (same maths, same meaning of u)."""
    size = float(config.image_size)
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


def array_batches(data: dict[str, np.ndarray], batch_size: int, seed: int, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Endless raw batches for the ``jax`` pipeline, from step ``start_step``; no TensorFlow.

    Yields {"image": u8[B, S, S, 1], "landmarks": f32[B, L, 2], "example": i32[B]}: example ``g``
    is face ``perm_e[g % N]`` of epoch ``e = g // N`` (a NumPy permutation seeded by (seed, e)),
    and ``g`` is what ``lgcn_jax.augment`` keys the example's change with, inside the step.
    """
    images, landmarks = data["image"], data["landmarks"].astype(np.float32)
    n = len(images)
    if n == 0:
        raise DatasetError("the training split is empty")
    g = start_step * batch_size
    epoch, perm = -1, None
    while True:
        ids = np.arange(g, g + batch_size, dtype=np.int64)
        idx = np.empty(batch_size, np.int64)
        for e in np.unique(ids // n):
            if e != epoch:
                epoch, perm = int(e), np.random.default_rng([seed, int(e)]).permutation(n)
            sel = ids // n == e
            idx[sel] = perm[ids[sel] % n]
        if ids[-1] >= 2**31:
            raise DatasetError("the training stream passed 2**31 examples; start a new run")
        yield {"image": images[idx], "landmarks": landmarks[idx], "example": ids.astype(np.int32)}
        g += batch_size


def eval_batches(data: dict[str, np.ndarray], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """The whole split in order, last batch padded; "valid" f32[B] marks real examples."""
    n = len(data["image"])
    for lo in range(0, n, batch_size):
        hi = min(n, lo + batch_size)
        yield {"image": pad_rows(data["image"][lo:hi].astype(np.float32) / 255.0, batch_size),
               "landmarks": pad_rows(data["landmarks"][lo:hi], batch_size),
               "valid": (np.arange(batch_size) < hi - lo).astype(np.float32)}


def prefetch_to_device(iterator, size: int = 2, put=None):
    """Keep ``size`` batches on the device ahead of the consumer, so the step never waits on a copy.

    ``put`` places one batch (default ``jax.device_put`` of each array; training passes
    ``sharding.shard_batch`` to split it over the devices).
    """
    put = put or (lambda batch: jax.tree_util.tree_map(jax.device_put, batch))
    queue = collections.deque()

    def enqueue(n):
        for _ in range(n):
            try:
                batch = next(iterator)
            except StopIteration:
                return
            queue.append(put(batch))

    enqueue(size)
    while queue:
        yield queue.popleft()
        enqueue(1)
