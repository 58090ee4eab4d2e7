"""The released weights side by side: NME on the 300-W common subset, GFLOP and ms per face on this machine.

    python bench/bench_weights.py --data_dir DIR [--names 300w_paper,300w_cpu]

For each released model (checkpoints/, ``lgcn_jax.release.released_names``; the synthetic ones are left out):
inter-ocular NME on the common subset with its own decoding (crops framed from the ground truth, as
``run_eval.py --split common`` reports it; needs a 300-W build or array export in --data_dir), FLOPs per face
counted from the layer table (bench_network.count_flops), and ms per face of ``predict`` (network and
decoding, after compilation, the median of --repeats) on one real face: the crop ``detect`` cuts from the
Grace Hopper photo bundled with matplotlib (the decoding iterates longer on a crop without a face).  The
README's table of weights is generated from the results (bench/make_docs.py).  Writes
bench/results_weights.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

from bench_network import count_flops
from common import machine, median_time, write_results

import matplotlib
import numpy as np

import lgcn_jax
from lgcn_jax import crop as crop_lib
from lgcn_jax import datasets, evaluation
from lgcn_jax.image_io import load_gray
from lgcn_jax.release import pretrained_path, released_names

PHOTO = os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "sample_data", "grace_hopper.jpg")


def face_crop(model) -> np.ndarray:
    """f32[1, S, S, 1]: the crop of the bundled photo's face that ``detect`` gives ``model``'s last pass."""
    gray = load_gray(PHOTO)
    (face,) = lgcn_jax.detect(gray, model)
    return (crop_lib.warp(gray, face.crop, model.data.image_size)[None, ..., None] / 255.0).astype(np.float32)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", help="a 300-W TFDS build or array export (without it, no NME)")
    p.add_argument("--names", help="comma-separated released names (default: every 300-W release)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results_weights.json"))
    args = p.parse_args(argv)
    names = args.names.split(",") if args.names else [n for n in released_names() if lgcn_jax.load_pretrained(n).data.dataset == "300w"]
    result = {"machine": machine(), "data_dir": os.path.abspath(args.data_dir) if args.data_dir else None, "weights": {}}
    for name in names:
        model = lgcn_jax.load_pretrained(name)
        size = model.data.image_size
        crop = face_crop(model)
        row = {"network": {k: getattr(model.params.config, k) for k in ("num_filters", "local_5x5_layers", "local_3x3_layers",
                                                                        "global_layers")},
               "image_size": size, "parameters": int(model.params.num_parameters()),
               "gflop_per_face": count_flops(model.config, size)["total"] / 1e9,
               "ms_per_face": 1e3 * median_time(lambda x: lgcn_jax.predict(model, x), crop, repeats=args.repeats),
               "licence": "non-commercial research (300-W)" if os.path.exists(os.path.join(pretrained_path(name), "LICENSE.md")) else "",
               "decoding": {k: getattr(model.postprocess, k) for k in ("peak_fit_radius", "x_offset")}}
        if args.data_dir:
            data = datasets.load_split(dataclasses.replace(model.data, data_dir=args.data_dir), "common")
            pred = evaluation.predict_landmarks(model, data)
            report = evaluation.evaluate_landmarks(pred, data["landmarks"])
            row["common"] = {"faces": int(len(pred)), "nme_inter_ocular": report["inter_ocular"]["nme"],
                             "nme_inter_pupil": report["inter_pupil"]["nme"], "auc_0.08": report["inter_ocular"]["auc@0.08"],
                             "failure_0.08": report["inter_ocular"]["failure@0.08"]}
        result["weights"][name] = row
        nme = f"{100 * row['common']['nme_inter_ocular']:.2f}%" if "common" in row else "-"
        print(f"{name:<14} common NME {nme:>7}  {row['gflop_per_face']:6.2f} GFLOP  {row['ms_per_face']:7.1f} ms per face  "
              f"{row['parameters']:>9,} parameters", flush=True)
    return write_results(result, args.out)


if __name__ == "__main__":
    main()
