"""Export the splits of a TFDS build to plain NumPy arrays, for machines without TensorFlow.

    python -m data_prep.export_arrays --dataset 300w --data_dir ~/tensorflow_datasets --out exports/300w

writes ``exports/300w/SPLIT.npz`` (u8 images, f32 landmarks, file names) for every split of the
build and ``lgcn_arrays.json`` describing them.  Train anywhere with
``python run_train.py --workdir ckpt --dataset 300w --data_dir exports/300w``: ``--data_dir``
takes either a TFDS data dir or such an export.  300-W at 96x96 is about 23 MB for train and common.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=["300w", "synthetic"], default="300w")
    p.add_argument("--data_dir", default="", help="TFDS data dir holding the build (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)")
    p.add_argument("--out", required=True, help="folder to write SPLIT.npz and lgcn_arrays.json to")
    p.add_argument("--splits", default="", help="comma-separated (default: every split of the build)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export in --out")
    args = p.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from lgcn_jax.config import DataConfig
    from lgcn_jax.input_pipeline import DatasetError, export_arrays

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
