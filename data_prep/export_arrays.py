"""Export the splits of a TFDS build to plain NumPy arrays, for machines without TensorFlow.

    python -m data_prep.export_arrays --dataset 300w --data_dir ~/tensorflow_datasets --out exports/300w

writes ``exports/300w/SPLIT.npz`` (u8 images, f32 landmarks, file names) for every split of the
build and ``lgcn_arrays.json`` describing them.  Train anywhere with
``python run_train.py --workdir ckpt --dataset 300w --data_dir exports/300w``: ``--data_dir``
takes either a TFDS data dir or such an export.  300-W at 96x96 is about 23 MB for train and common.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from lgcn_jax.config import DataConfig
from lgcn_jax.datasets import (ARRAYS_FORMAT, ARRAYS_META, absent_split_error, available_splits, is_export, resolve_data_dir,
                               tfds_split)
from lgcn_jax.errors import DatasetError
from lgcn_jax.files import atomic_path

__all__ = ["export_arrays", "main"]


def export_arrays(config: DataConfig, out_dir: str, splits=None, overwrite: bool = False) -> dict:
    """Write the splits of a TFDS build as ``SPLIT.npz`` + ``lgcn_arrays.json`` under ``out_dir`` (needs TensorFlow).

    Images keep the build's size (resized when loaded).  Refuses to replace an existing export unless ``overwrite``.
    Returns the metadata written.
    """
    data_dir = resolve_data_dir(config)
    if is_export(data_dir):
        raise DatasetError(f"{data_dir} is already an array export; export_arrays reads a TFDS build (the --data_dir of build_300w)")
    available = available_splits(config)
    names = list(splits) if splits else available
    for name in names:
        if name not in available:
            raise absent_split_error(name, config, data_dir, available)
    meta_path = os.path.join(out_dir, ARRAYS_META)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise DatasetError(f"--out {out_dir} is a file; name a folder")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        what = f"an export ({ARRAYS_META})" if os.path.exists(meta_path) else f"other files ({', '.join(sorted(os.listdir(out_dir))[:3])})"
        raise DatasetError(f"{out_dir} is not empty: it holds {what}; nothing was written. Pass overwrite=True (--overwrite) or an empty folder")
    meta = {"format": ARRAYS_FORMAT, "dataset": config.dataset, "source": os.path.abspath(data_dir), "splits": {}}
    for name in names:
        arrays = tfds_split(data_dir, config, name)
        file = f"{name}.npz"
        with atomic_path(os.path.join(out_dir, file), ".npz") as tmp:
            np.savez(tmp, **arrays)
        meta["splits"][name] = {"file": file, "num_examples": int(len(arrays["image"])), "image_size": int(arrays["image"].shape[1])}
    with atomic_path(meta_path) as tmp, open(tmp, "w") as f:
        json.dump(meta, f, indent=1)
    return meta


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=["300w", "synthetic"], default="300w")
    p.add_argument("--data_dir", default="", help="TFDS data dir holding the build (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)")
    p.add_argument("--out", required=True, help="folder to write SPLIT.npz and lgcn_arrays.json to")
    p.add_argument("--splits", default="", help="comma-separated (default: every split of the build)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export in --out")
    args = p.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    splits = [s for s in args.splits.split(",") if s] or None
    try:
        meta = export_arrays(DataConfig(dataset=args.dataset, data_dir=args.data_dir), args.out, splits, overwrite=args.overwrite)
    except DatasetError as e:
        print(f"export_arrays: error: {e}", file=sys.stderr)
        return 1
    for name, entry in meta["splits"].items():
        size = os.path.getsize(os.path.join(args.out, entry["file"])) / 2**20
        print(f"{name:<12} {entry['num_examples']:>5} faces  {entry['image_size']} px  {size:.1f} MiB")
    print(f"written to {os.path.abspath(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
