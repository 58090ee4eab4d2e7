"""Evaluate a trained LGCN.  Example: python run_eval.py --workdir ckpt --split validation"""

from __future__ import annotations

import argparse
import json
import os
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--workdir", required=True, help="a run_train.py workdir")
    p.add_argument("--split", default="validation", help="synthetic: validation/test; 300w: common/challenging/full/test")
    p.add_argument("--which", choices=["best", "last"], default="best", help="which checkpoint to load")
    p.add_argument("--out", help="JSON report path (default WORKDIR/eval_SPLIT.json)")
    args = p.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import lgcn_jax
    from lgcn_jax import input_pipeline, metrics, train
    from lgcn_jax.input_pipeline import DatasetError

    try:
        params, config = lgcn_jax.load_params(args.workdir, which=args.which)
        data = input_pipeline.load_split(config.data, args.split)
    except (lgcn_jax.CheckpointError, DatasetError) as e:
        print(f"run_eval.py: error: {e}", file=sys.stderr)
        return 1
    pred = train.predict_split(params, data)
    report = {"split": args.split, "num_faces": int(len(pred))}
    for norm in ("inter_ocular", "inter_pupil"):
        errors = metrics.nme(pred, data["landmarks"], norm)
        auc, failure = metrics.auc_and_failure(errors)
        report[norm] = {"nme": float(errors.mean()), "auc@0.08": auc, "failure@0.08": failure, "per_image": errors.tolist()}
    out = args.out or os.path.join(args.workdir, f"eval_{args.split}.json")
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"{'split':<12}{'norm':<14}{'NME %':>8}{'AUC@0.08':>10}{'fail %':>8}")
    for norm in ("inter_ocular", "inter_pupil"):
        r = report[norm]
        print(f"{args.split:<12}{norm:<14}{100 * r['nme']:>8.2f}{r['auc@0.08']:>10.4f}{100 * r['failure@0.08']:>8.2f}")
    print(f"report: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
