"""lgcn-eval (python run_eval.py): evaluate a trained LGCN on 300-W (or the synthetic data): NME, AUC, failure rate, CED plot.

Examples:
  python run_eval.py --split common                       # the released default weights (lgcn_jax.load_pretrained)
  python run_eval.py --workdir ckpt --split challenging
  python run_eval.py --checkpoint synthetic_quick --split validation,test --no_shape_model   # released weights by name
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import jax

from lgcn_jax import datasets, evaluation
from lgcn_jax.config import EXECUTION_FIELDS, apply_overrides
from lgcn_jax.errors import CheckpointError, DatasetError, ShapeModelError
from lgcn_jax.logs import quiet_failed_restores
from lgcn_jax.release import checkpoint_path, load_model

__all__ = ["main"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--workdir", help="a run_train.py workdir (reports go to WORKDIR/eval)")
    src.add_argument("--checkpoint", help="a checkpoint folder (a workdir or an exported one), or the name of released weights "
                                          "(300w_paper, 300w_cpu42, 300w_cpu48, 300w_cpu, synthetic_quick); default: lgcn_jax.load_pretrained()'s")
    p.add_argument("--split", default=None,
                   help="comma-separated; 300w: common, challenging, full, test (default: common,challenging,full); "
                        "synthetic: validation, test (default: test)")
    p.add_argument("--which", choices=["best", "last"], default="best", help="which checkpoint of a workdir to load")
    p.add_argument("--no_shape_model", action="store_true", help="decode by sub-pixel arg-max only, without the PCA shape model")
    p.add_argument("--flip_test", action="store_true",
                   help="also run the network on the mirrored faces and average the heatmaps (postprocess.flip_test; twice the time)")
    p.add_argument("--config", nargs="*", default=[], metavar="KEY=VALUE",
                   help="post-processing, data and execution overrides, e.g. postprocess.local_windows=() data.data_dir=/data/tfds "
                        "execution.compute_dtype=bfloat16")
    p.add_argument("--data_dir", help="shortcut for data.data_dir")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--out", help="folder for eval_SPLIT.json and ced_SPLIT.png (_argmax appended with --no_shape_model, _flip with flip_test; "
                                 "default: WORKDIR/eval with --workdir, else ./eval)")
    p.add_argument("--no_progress", action="store_true")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error(f"--batch_size must be at least 1, got {args.batch_size}")
    if args.split is not None and not [s for s in args.split.split(",") if s.strip()]:
        p.error(f"--split {args.split!r} names no split")
    # Never into a checkpoint folder (it may be the installed package's): only a workdir keeps its reports.
    out_dir = args.out or (os.path.join(args.workdir, "eval") if args.workdir else "eval")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        p.error(f"--out {out_dir} is a file; reports go to a folder")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    quiet_failed_restores()
    try:
        path = args.workdir or checkpoint_path(args.checkpoint)  # no flag: the released default weights
        model = load_model(path, which=args.which, require_shape_model=not args.no_shape_model)
        overrides = (list(args.config) + ([f"data.data_dir={args.data_dir}"] if args.data_dir else [])
                     + (["postprocess.flip_test=true"] if args.flip_test else []))
        old_spelling = tuple(f"model.{name}=" for name in sorted(EXECUTION_FIELDS))  # before the execution section
        bad = [o for o in overrides if not o.startswith(("postprocess.", "data.", "execution.", *old_spelling))]
        if bad:
            raise ValueError(f"only postprocess.*, data.* and execution.* (how the network runs) can be overridden at evaluation, not {bad}")
        config = apply_overrides(model.config, overrides)
        if args.no_shape_model:
            config = dataclasses.replace(config, postprocess=dataclasses.replace(config.postprocess, use_shape_model=False))
        model = model.replace(data=config.data, postprocess=config.postprocess,
                              shape_model=None if args.no_shape_model else model.shape_model).with_execution(**dataclasses.asdict(config.execution))
        if args.split:
            splits = [s.strip() for s in args.split.split(",") if s.strip()]
        else:  # the default splits that this build holds; a named split that is absent is an error below
            default = ["common", "challenging", "full"] if config.data.dataset == "300w" else ["test"]
            have = datasets.available_splits(config.data)
            splits = [s for s in default if s in have]
            for s in default:
                if s not in have:
                    print(f"run_eval.py: note: split {s!r} is not in this build; skipping it (see docs/data.md)", file=sys.stderr)
            if not splits:
                raise DatasetError(f"none of the splits {default} is in the build under {config.data.data_dir or 'the default data dir'}")
        data = {s: datasets.load_split(config.data, s) for s in splits}
    except (CheckpointError, ShapeModelError, DatasetError) as e:
        print(f"run_eval.py: error: {e}", file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"run_eval.py: error: {e}", file=sys.stderr)
        return 2
    decoder = ("argmax" if args.no_shape_model else "shape_model") + (" + flip_test" if config.postprocess.flip_test else "")
    suffix = ("_argmax" if args.no_shape_model else "") + ("_flip" if config.postprocess.flip_test else "")
    # How the numbers were computed, beyond the weights: every execution field (each changes per-image NME slightly)
    # and the device (a GPU's convolutions run in TF32).
    execution_record = {**dataclasses.asdict(config.execution), "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind, "jax": jax.__version__}
    reports = {}
    for split, d in data.items():
        try:
            pred = evaluation.predict_landmarks(model, d, args.batch_size, progress=not args.no_progress)
        except ValueError as e:  # e.g. a data.image_size override that the shape model was not built for
            print(f"run_eval.py: error: {e}", file=sys.stderr)
            return 2
        rep = {"split": split, "dataset": config.data.dataset, "checkpoint": os.path.abspath(path), "decoder": decoder,
               "compute_dtype": config.execution.compute_dtype, "execution": execution_record, "postprocess": dataclasses.asdict(config.postprocess),
               "num_faces": int(len(pred))}
        rep.update(evaluation.evaluate_landmarks(pred, d["landmarks"]))
        if "file_name" in d:
            rep["file_names"] = [str(f) for f in d["file_name"]]  # aligned with the per_image lists
            rep["subsets"] = evaluation.subset_reports(pred, d["landmarks"], d["file_name"])
        rep["json"] = evaluation.write_report(rep, os.path.join(out_dir, f"eval_{split}{suffix}.json"))
        errors = {norm: rep[norm]["per_image"] for norm in evaluation.NORMS}
        rep["png"] = evaluation.plot_ced(errors, os.path.join(out_dir, f"ced_{split}{suffix}.png"), title=f"{config.data.dataset} {split} ({decoder})")
        reports[split] = rep
        for name, sub in rep.get("subsets", {}).items():
            reports[f"{split}/{name}"] = sub
    print(evaluation.format_table(reports))
    for rep in reports.values():
        if "json" in rep:
            print(f"{rep['split']}: {rep['json']}  {rep['png']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
