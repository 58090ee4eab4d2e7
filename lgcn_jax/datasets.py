"""Datasets in memory: the splits of a TFDS build or of a TF-free array export, and the validation holdout.

A split is small (300-W train is 3148 faces; 96x96 u8 is 29 MB), so it is held in memory as
{"image": u8[N, S, S, 1], "landmarks": f32[N, 68, 2]} (and "file_name" str[N] for 300-W).

Splits come from a TFDS data dir (reading it needs TensorFlow: ``pip install "lgcn_jax[data]"``),
or from a folder written by ``python -m data_prep.export_arrays`` (one ``SPLIT.npz`` per split and
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

import jax
import numpy as np

from data_prep.layout_300w import SUBSETS, absent_split_message
from lgcn_jax.config import DataConfig
from lgcn_jax.errors import DatasetError

__all__ = ["load_split", "available_splits", "holdout", "photo_id", "has_tensorflow", "tfds_split", "ARRAYS_META", "ARRAYS_FORMAT",
           "DatasetError", "resolve_data_dir", "is_export", "resize_images", "absent_split_error"]

ARRAYS_META = "lgcn_arrays.json"
ARRAYS_FORMAT = 1
DATA_EXTRA = 'pip install "lgcn_jax[data]"'


def has_tensorflow() -> bool:
    """Whether TensorFlow and tensorflow-datasets are installed (the ``data`` extra)."""
    return importlib.util.find_spec("tensorflow") is not None and importlib.util.find_spec("tensorflow_datasets") is not None


def resolve_data_dir(config: DataConfig) -> str:
    """The data folder of ``config``; an error naming it when it cannot hold 300-W (synthetic data is built there)."""
    data_dir = os.path.expanduser(config.data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets"))
    if os.path.exists(data_dir) and not os.path.isdir(data_dir):
        raise DatasetError(f"data dir {data_dir} is a file; data.data_dir (--data_dir) takes a folder: a TFDS data dir or an array export")
    if config.dataset == "300w" and not os.path.isdir(data_dir):
        raise DatasetError(f"data dir {data_dir} does not exist; pass the folder that holds the 300-W build or export (--data_dir, "
                           f"data.data_dir; a workdir keeps the one it was trained with in config.json), or build it with "
                           f"`python -m data_prep.build_300w --manual_dir PATH/TO/300W --data_dir {data_dir}`")
    return data_dir


def is_export(data_dir: str) -> bool:
    """Whether ``data_dir`` is an array export (``data_prep.export_arrays``) rather than a TFDS data dir."""
    return os.path.exists(os.path.join(data_dir, ARRAYS_META))


_SPLIT_ALIASES = {"synthetic": {"val": "validation"}, "300w": {}}


def load_split(config: DataConfig, split: str) -> dict[str, np.ndarray]:
    """Load a whole split into memory (from an array export, or TFDS, building synthetic data if needed).

    Returns {"image": u8[N, S, S, 1], "landmarks": f32[N, 68, 2]} (and "file_name" str[N] for 300-W),
    resized to ``config.image_size`` if stored at another size.
    """
    data_dir = resolve_data_dir(config)
    split = _SPLIT_ALIASES.get(config.dataset, {}).get(split, split)
    if is_export(data_dir):
        out = _load_exported(data_dir, config, split)
    else:
        out = tfds_split(data_dir, config, split)
    stored = out["image"].shape[1]
    if out["image"].shape[1:3] != (config.image_size, config.image_size):
        out["image"] = resize_images(out["image"], config.image_size)
        # Pixel centres: continuous coordinate u = x + 0.5 scales with the image.
        out["landmarks"] = (out["landmarks"] + 0.5) * (config.image_size / stored) - 0.5
    return out


def absent_split_error(split: str, config: DataConfig, data_dir: str, available) -> DatasetError:
    if config.dataset == "300w":
        exported = is_export(data_dir)
        return DatasetError(absent_split_message(split, data_dir) + f" (this {'export' if exported else 'build'} has: {', '.join(sorted(available))})"
                            + ("; then export it again with `python -m data_prep.export_arrays`" if exported and split in SUBSETS else ""))
    return DatasetError(f"split {split!r} does not exist in {config.dataset} under {data_dir}; available: {sorted(available)}")


def _tfds_builder(data_dir: str, config: DataConfig):
    if not has_tensorflow():
        raise DatasetError(
            f"{data_dir} holds no array export ({ARRAYS_META}) and TensorFlow is not installed to read a TFDS build "
            f"({DATA_EXTRA}); or export the splits on a machine with TensorFlow: `python -m data_prep.export_arrays --dataset "
            f"{config.dataset} --data_dir TFDS_DIR --out DIR`, then pass --data_dir DIR"
        )
    import tensorflow as tf
    import tensorflow_datasets as tfds

    tf.config.set_visible_devices([], "GPU")  # TFDS reads on the CPU; the accelerator is JAX's
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


def tfds_split(data_dir: str, config: DataConfig, split: str) -> dict[str, np.ndarray]:
    """One split of the TFDS build under ``data_dir`` as arrays (needs the ``data`` extra)."""
    builder = _tfds_builder(data_dir, config)  # first: without TensorFlow it says what to do instead
    import tensorflow_datasets as tfds

    if split not in builder.info.splits:
        raise absent_split_error(split, config, data_dir, builder.info.splits)
    arrays = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1, shuffle_files=False))
    out = {"image": arrays["image"], "landmarks": arrays["landmarks"].astype(np.float32)}
    if "file_name" in arrays:  # 300-W: which photo each face came from
        out["file_name"] = np.array([f.decode() if isinstance(f, bytes) else str(f) for f in arrays["file_name"]])
    return out


def available_splits(config: DataConfig) -> list[str]:
    """The splits that ``config.data_dir`` holds for ``config.dataset``."""
    data_dir = resolve_data_dir(config)
    if is_export(data_dir):
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
        raise absent_split_error(split, config, data_dir, meta["splits"])
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


def photo_id(file_name: str) -> str:
    """The photo a face came from: 'afw/4538917191_16.jpg' -> 'afw/4538917191'.

    300-W numbers the faces of a photo _1, _2, ... (no leading zero); LFPW's zero-padded
    'image_0046' is a photo, not a face index, and is kept whole.
    """
    return re.sub(r"_[1-9]\d?$", "", os.path.splitext(file_name)[0])


def holdout(data: dict[str, np.ndarray], num_faces: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Split a training split into (train, validation) with about ``num_faces`` validation faces.

    Whole photos go to one side (faces of one photo share its person and lighting), each
    subset folder contributes its share of ``num_faces`` (rounded) in whole photos until
    that share is reached, so the total can differ by a few faces (200 asked gave 199 on
    300-W's partial training set), and photos are chosen by a CRC32
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


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """u8[N, S, S, 1] -> u8[N, size, size, 1], antialiased bilinear (TensorFlow's ``resize(antialias=True)``)."""
    out = jax.image.resize(np.asarray(images, np.float32), (len(images), size, size, images.shape[-1]), "linear", antialias=True)
    return np.asarray(jax.numpy.clip(jax.numpy.round(out), 0, 255)).astype(np.uint8)
