"""lgcn-export CHECKPOINT --format onnx|tflite --out FILE: the network and its arg-max decoding for ONNX Runtime or LiteRT."""

from __future__ import annotations

import argparse
import os
import sys

from lgcn_jax.errors import CheckpointError, ShapeModelError
from lgcn_jax.export import FORMATS, export
from lgcn_jax.release import is_folder, released_names, resolve_model

__all__ = ["main", "parser"]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lgcn-export", description="Write a model as an ONNX or LiteRT (.tflite) file: crops in, "
                                "heatmaps, landmarks and confidence out (docs/export.md).")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help=f"a model folder, or the name of released weights ({', '.join(released_names())})")
    p.add_argument("--format", choices=sorted(FORMATS), help="default: by the ending of --out")
    p.add_argument("--out", required=True, metavar="FILE", help="the file to write (.onnx or .tflite)")
    p.add_argument("--batch_size", type=int, default=1, help="tflite: the batch the file is fixed to (ONNX files take any batch)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return p


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error(f"--batch_size must be at least 1, got {args.batch_size}")
    if args.batch_size != 1 and (args.format or "").lower() != "tflite" and not args.out.lower().endswith(".tflite"):
        p.error("--batch_size is for .tflite files; an ONNX file takes any batch")
    if is_folder(args.checkpoint) and not os.path.isdir(args.checkpoint):
        print(f"lgcn-export: error: {args.checkpoint} is not a folder; a model is a folder holding config.json and params.msgpack "
              f"(run_train.py's workdir or an exported model) or released weights by name ({', '.join(released_names())})",
              file=sys.stderr)
        return 1
    options = {"batch_size": args.batch_size} if args.batch_size != 1 else {}
    try:
        model = resolve_model(args.checkpoint, "CHECKPOINT")  # errors about the checkpoint come before those about the extra
        path = export(model, args.out, args.format, overwrite=args.overwrite, **options)
    except (CheckpointError, ShapeModelError, ValueError, ImportError, OSError) as e:
        print(f"lgcn-export: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    print(f"{path}: {os.path.getsize(path) / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
