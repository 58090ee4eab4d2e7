"""lgcn-train (python run_train.py): train LGCN.  Example: python run_train.py --workdir ckpt [--preset paper] [--config train.num_steps=2000 ...]"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from lgcn_jax import train
from lgcn_jax.config import apply_overrides, get_config, read_config
from lgcn_jax.errors import CheckpointError, DatasetError, ShapeModelError
from lgcn_jax.logs import quiet_failed_restores
from lgcn_jax.release import is_folder
from lgcn_jax.sharding import initialize_distributed

__all__ = ["main", "parse_args"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="checkpoints, config.json and TensorBoard logs go here; rerun to resume")
    p.add_argument("--preset", default="quick", help="quick (default: small net, synthetic faces, minutes on a CPU), cpu (300-W on a CPU in ~100 min), paper (128 filters), paper64")
    p.add_argument("--config", nargs="*", default=[], metavar="KEY=VALUE", help="overrides, e.g. model.num_filters=64 train.batch_size=8")
    p.add_argument("--dataset", choices=["synthetic", "300w"], help="shortcut for data.dataset")
    p.add_argument("--data_dir", help="shortcut for data.data_dir: a TFDS data directory, or an array export (data_prep.export_arrays)")
    p.add_argument("--init_from", metavar="CHECKPOINT",
                   help="fine-tune: start a fresh run from these weights (a checkpoint folder, or released weights by name, "
                        "e.g. 300w_paper) instead of random ones; shortcut for train.init_from")
    p.add_argument("--no_progress", action="store_true", help="no progress bar (for logs)")
    p.add_argument("--distributed", action="store_true",
                   help="one of several processes (hosts): call jax.distributed.initialize() first (docs/training.md: several GPUs, several hosts)")
    p.add_argument("--export", metavar="DIR",
                   help="only write the workdir's best checkpoint to DIR as a self-contained folder (for load_model, checkpoints/)")
    p.add_argument("--recalibrate", type=int, default=0, metavar="N",
                   help="with --export: measure the BatchNorm statistics again over N batches of training crops first")
    p.add_argument("--tune_decoding", action="store_true",
                   help="with --export: choose postprocess.peak_fit_radius, local_windows and x_offset on the validation faces (docs/decoding.md)")
    p.add_argument("--calibrate_x_offset", action="store_true",
                   help="with --export: measure postprocess.x_offset on the validation faces (docs/decoding.md: horizontal offset)")
    p.add_argument("--shape_model_only", action="store_true",
                   help="only (re)build WORKDIR/shape_model.npz from the training split of the workdir's stored config")
    args = p.parse_args(argv)
    if args.recalibrate < 0 or (args.recalibrate and not args.export):
        p.error("--recalibrate N takes N >= 0 and goes with --export")
    if args.calibrate_x_offset and not args.export:
        p.error("--calibrate_x_offset goes with --export")
    if args.tune_decoding and not args.export:
        p.error("--tune_decoding goes with --export")
    if args.data_dir:
        # Stored in WORKDIR/config.json: absolute, so that later commands from another folder find it.
        args.data_dir = os.path.abspath(os.path.expanduser(args.data_dir))
    if args.init_from and is_folder(args.init_from):
        # A folder (not the name of released weights) is stored absolute.
        args.init_from = os.path.abspath(os.path.expanduser(args.init_from))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("lgcn_jax").setLevel(logging.INFO)
    logging.getLogger("absl").setLevel(logging.WARNING)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    quiet_failed_restores()
    if args.distributed:
        try:
            initialize_distributed()  # coordinator, process count and id from the environment (or the cluster)
        except ValueError as e:
            print(f"run_train.py: error: --distributed: {e}", file=sys.stderr)
            return 2
    overrides = list(args.config)
    if args.dataset:
        overrides.append(f"data.dataset={args.dataset}")
    if args.data_dir:
        overrides.append(f"data.data_dir={args.data_dir}")
    if args.init_from:
        overrides.append(f"train.init_from={args.init_from}")
    try:
        config = apply_overrides(get_config(args.preset), overrides)
    except ValueError as e:
        print(f"run_train.py: error: {e}", file=sys.stderr)
        return 2
    if args.export:
        try:
            path = train.export_workdir(args.workdir, args.export, recalibrate_batches=args.recalibrate, data_dir=args.data_dir,
                                        calibrate_x_offset=args.calibrate_x_offset, tune_decoding=args.tune_decoding)
        except (CheckpointError, ShapeModelError, DatasetError, ValueError) as e:
            print(f"run_train.py: error: {e}", file=sys.stderr)
            return 1
        print(f"wrote {path}")
        return 0
    if args.shape_model_only:
        try:
            stored = read_config(args.workdir)
            if args.data_dir:
                stored = apply_overrides(stored, [f"data.data_dir={args.data_dir}"])
            existed = os.path.exists(os.path.join(args.workdir, "shape_model.npz"))
            path = train.write_shape_model(stored, args.workdir)
        except (CheckpointError, DatasetError) as e:
            print(f"run_train.py: error: {e}", file=sys.stderr)
            return 1
        print(f"{'replaced' if existed else 'wrote'} {path}")
        return 0
    try:
        result = train.train_and_evaluate(config, args.workdir, progress=not args.no_progress)
    except train.TrainingInterrupted as e:
        print(f"run_train.py: {e}", file=sys.stderr)
        return e.exit_code
    except (CheckpointError, DatasetError, FloatingPointError, ValueError) as e:
        print(f"run_train.py: error: {e}", file=sys.stderr)
        return 1
    print(f"final validation NME {result['nme']:.4f} (AUC@0.08 {result['auc']:.4f}, failure rate {result['failure_rate']:.3f}) -> {args.workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
