"""Real photos end to end: detect() in several settings against crops from the ground truth, and against dlib.

    python bench/compare_end_to_end.py --data ../shared/data/300w_partial [--peers] [--limit N] [--pipeline LABEL:KEY=VALUE,...]

On the 300-W common subset (HELEN test + LFPW test, 554 faces; each image holds its annotated face
with context twice its size): for each face,
  * gt-box: one pass of this machine's default weights on the crop framed from the ground-truth
    landmarks (the evaluation crop: the landmarks' box, side 1.4x), no detector;
  * every pipeline: ``detect()`` with those arguments on the whole photo (default: this machine's
    defaults, and the paper network with the full search and two passes); the annotated face is the
    found face whose landmark-box centre is nearest (within 0.3 face sizes: ``metrics.match_face``);
  * --peers: dlib's HOG detector at upsample 0 and 1 with its 68-point predictor (``pip install
    "lgcn_jax[peers]"``), matched the same way.
Inter-ocular NME (outer eye corners) over the faces each found; recall = found / annotated; ms per
photo, decoding excluded, the median over the photos.  Writes bench/results_end_to_end.json.
"""

from __future__ import annotations

import argparse
import glob
import os
import time

from common import machine, write_results
from peers import Dlib

import numpy as np

import lgcn_jax
from data_prep.layout_300w import read_pts
from lgcn_jax import crop as crop_lib
from lgcn_jax import metrics
from lgcn_jax.detect import landmarks
from lgcn_jax.image_io import load_gray
from lgcn_jax.machine import defaults

SUBSETS = ("helen/testset", "lfpw/testset")
PIPELINES = ["default:", "300w_paper, two passes:params=300w_paper,detector=yunet,refine=1"]


def nme(points, truth) -> float:
    """Inter-ocular NME of one face's points f[68, 2]."""
    return float(metrics.nme(points[None], truth[None])[0])


def nearest(candidates: list[np.ndarray], truth: np.ndarray):
    """The candidate landmark set that is the annotated face (``metrics.match_face``), or None."""
    k = metrics.match_face(candidates, truth)
    return None if k is None else candidates[k]


def from_ground_truth(model, gray: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Landmarks f32[68, 2] from one pass on the crop framed from the ground truth (the evaluation crop)."""
    size, ratio = model.data.image_size, crop_lib.crop_ratio(model.data.dataset)
    lo, hi = truth.min(0), truth.max(0)
    box = crop_lib.similarity((lo + hi) / 2, float((hi - lo).max()) * ratio, 0.0, size)
    (face,) = landmarks(model, [gray], [0], [box], [1.0], refine=0)
    return face.landmarks


def summarise(rows: list[dict], key: str, n: int) -> dict:
    errs = np.array([r[key] for r in rows if r.get(key) is not None])
    ms = [r[key + "_ms"] for r in rows if key + "_ms" in r]
    by = {}
    for sub in SUBSETS:
        e = np.array([r[key] for r in rows if r["subset"] == sub and r.get(key) is not None])
        by[sub.split("/")[0]] = float(e.mean()) if len(e) else None
    return {"faces": n, "found": int(len(errs)), "recall": len(errs) / max(n, 1), "nme": float(errs.mean()) if len(errs) else None,
            "nme_by_subset": by, "failure_rate_0.08": float(np.mean(errs > 0.08)) if len(errs) else None,
            "ms_per_image": float(np.median(ms)) if ms else None}


def parse_pipeline(text: str) -> tuple[str, dict]:
    """"LABEL:KEY=VALUE,..." -> (label, detect()'s keyword arguments)."""
    label, _, args = text.partition(":")
    kwargs = {k: int(v) if v.isdigit() else v for k, v in (kv.split("=", 1) for kv in args.split(",") if kv)}
    return label, kwargs


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data", "300w_partial"))
    p.add_argument("--peers", action="store_true", help="also dlib end to end (pip install 'lgcn_jax[peers]')")
    p.add_argument("--pipeline", action="append", metavar="LABEL:KEY=VALUE,...",
                   help=f"detect()'s arguments for a row (default: {' and '.join(repr(x) for x in PIPELINES)})")
    p.add_argument("--limit", type=int, default=0, help="first N faces of each subset (0: all)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results_end_to_end.json"))
    args = p.parse_args(argv)
    pipelines = [parse_pipeline(x) for x in (args.pipeline or PIPELINES)]
    model = lgcn_jax.default_model()
    peers = {f"dlib up{u}": Dlib(u) for u in (0, 1)} if args.peers else {}
    rows = []
    for sub in SUBSETS:
        files = sorted(glob.glob(os.path.join(args.data, sub, "*.jpg")) + glob.glob(os.path.join(args.data, sub, "*.png")))
        if not files:
            raise SystemExit(f"no images in {os.path.join(args.data, sub)}: pass --data DIR (the 300-W folder layout)")
        for path in files[: args.limit or None]:
            gray = load_gray(path)
            truth = read_pts(os.path.splitext(path)[0] + ".pts").astype(np.float64)
            row = {"subset": sub, "image": os.path.basename(path), "gt_box": nme(from_ground_truth(model, gray, truth), truth)}
            for label, kwargs in pipelines:
                t = time.perf_counter()
                found = lgcn_jax.detect(gray, **kwargs)
                row[f"{label}_ms"] = 1e3 * (time.perf_counter() - t)
                match = nearest([f.landmarks for f in found], truth)
                row[label] = None if match is None else nme(match, truth)
            for label, peer in peers.items():
                t = time.perf_counter()
                found = peer.landmarks(gray)
                row[f"{label}_ms"] = 1e3 * (time.perf_counter() - t)
                match = nearest(found, truth)
                row[label] = None if match is None else nme(match, truth)
            rows.append(row)
    n = len(rows)
    result = {"machine": machine(), "data": os.path.abspath(args.data), "defaults": vars(defaults()), "weights": model.name,
              "gt_box": summarise(rows, "gt_box", n),
              "pipelines": [{"settings": ", ".join(f"{k}={v!r}" for k, v in kw.items()) or "this machine's defaults", "label": label,
                             **summarise(rows, label, n)} for label, kw in pipelines],
              "peers": {label: summarise(rows, label, n) for label in peers}}
    for r in [{"label": "gt_box", **result["gt_box"]}, *result["pipelines"], *({"label": k, **v} for k, v in result["peers"].items())]:
        ms = f"{r['ms_per_image']:6.1f} ms/image" if r["ms_per_image"] else ""
        print(f"{r['label']:<24} found {r['found']:>3}/{r['faces']} ({100 * r['recall']:.1f}%)  NME {100 * r['nme']:.2f}%  "
              f"(HELEN {100 * r['nme_by_subset']['helen']:.2f}%, LFPW {100 * r['nme_by_subset']['lfpw']:.2f}%)  {ms}", flush=True)
    return write_results(result, args.out)


if __name__ == "__main__":
    main()
