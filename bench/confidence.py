"""Mean point confidence of faces, background and noise: where ``track``'s ``min_confidence`` must fall.

    python bench/confidence.py --data ../shared/data/300w_partial [--weights 300w_cpu48 --weights 300w_cpu]

For each model, the mean over its 68 points of ``Face.confidence`` (the heatmap value at each point) on
  * faces: the 300-W common subset (HELEN test + LFPW test), one pass on the crop framed from the ground truth
    (the evaluation crop: the landmarks' box, side 1.4x);
  * background: from the same photos, square crops of a third of the shorter side at the four corners, those
    clear of the annotated landmarks' box (hair, clothes, walls, sky; other faces are not annotated and may appear);
  * noise: crops of uniform noise (seeded).
``lgcn_jax.track.MIN_CONFIDENCE`` should lie below every face and above the background and noise crops (a
corner crop can hold part of an unannotated face: those count as background here).
Writes bench/results_confidence.json.
"""

from __future__ import annotations

import argparse
import glob
import os

from common import machine, write_results

import numpy as np

from data_prep.layout_300w import read_pts
from lgcn_jax import crop as crop_lib
from lgcn_jax.detect import landmarks
from lgcn_jax.image_io import load_gray
from lgcn_jax.release import resolve_model
from lgcn_jax.track import MIN_CONFIDENCE

SUBSETS = ("helen/testset", "lfpw/testset")


def summary(values: np.ndarray) -> dict:
    v = np.asarray(values, np.float64)
    return {"n": int(v.size), "min": float(v.min()), "p01": float(np.percentile(v, 1)), "median": float(np.median(v)),
            "p99": float(np.percentile(v, 99)), "max": float(v.max())}


def measure(model, photos: list[str], noise_crops: int, seed: int = 0) -> dict:
    size, ratio = model.data.image_size, crop_lib.crop_ratio(model.data.dataset)
    grays, owners, maps, kinds = [], [], [], []
    for path in photos:
        gray, truth = load_gray(path), read_pts(os.path.splitext(path)[0] + ".pts")
        lo, hi = truth.min(0), truth.max(0)
        center, side = (lo + hi) / 2, float((hi - lo).max()) * ratio
        grays.append(gray)
        h, w = gray.shape
        corner = min(h, w) / 3
        crops = [("faces", center, side)]
        for cx in (corner / 2, w - corner / 2):
            for cy in (corner / 2, h - corner / 2):
                clear = cx + corner / 2 < lo[0] or cx - corner / 2 > hi[0] or cy + corner / 2 < lo[1] or cy - corner / 2 > hi[1]
                if clear:
                    crops.append(("background", np.array([cx, cy]) - 0.5, corner))
        for kind, c, s in crops:
            owners.append(len(grays) - 1)
            maps.append(crop_lib.similarity(c, s, 0.0, size))
            kinds.append(kind)
    rng = np.random.default_rng(seed)
    for _ in range(noise_crops):
        grays.append(rng.integers(0, 256, (size, size), dtype=np.uint8))
        owners.append(len(grays) - 1)
        maps.append(crop_lib.similarity(((size - 1) / 2, (size - 1) / 2), size, 0.0, size))
        kinds.append("noise")
    faces = landmarks(model, grays, owners, maps, [1.0] * len(maps), refine=0)
    mean = np.array([float(f.confidence.mean()) for f in faces])
    kinds = np.array(kinds)
    out = {kind: summary(mean[kinds == kind]) for kind in ("faces", "background", "noise")}
    out["faces_below_min_confidence"] = int((mean[kinds == "faces"] < MIN_CONFIDENCE).sum())
    out["others_above_min_confidence"] = int((mean[kinds != "faces"] >= MIN_CONFIDENCE).sum())
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "300w_partial"))
    p.add_argument("--weights", action="append", default=[], help="released weights or a model folder (repeatable; default: "
                                                                   "this machine's default weights)")
    p.add_argument("--limit", type=int, default=0, help="at most this many photos (0: all)")
    p.add_argument("--noise", type=int, default=200, help="crops of uniform noise")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results_confidence.json"))
    args = p.parse_args(argv)
    photos = [f for sub in SUBSETS for f in sorted(glob.glob(os.path.join(args.data, sub, "*.jpg")))]
    if not photos:
        raise SystemExit(f"no 300-W test photos under {args.data!r}: pass --data (the folder of ../shared/data/300w_partial)")
    photos = photos[: args.limit] if args.limit else photos
    result = {"machine": machine(), "photos": len(photos), "min_confidence": MIN_CONFIDENCE, "weights": {}}
    for spec in args.weights or [None]:
        model = resolve_model(spec)
        result["weights"][model.name] = r = measure(model, photos, args.noise)
        print(f"{model.name}: mean point confidence (min / median / max)")
        for kind in ("faces", "background", "noise"):
            s = r[kind]
            print(f"  {kind:<11} {s['n']:5d} crops  {s['min']:.3f} / {s['median']:.3f} / {s['max']:.3f}")
        print(f"  min_confidence {MIN_CONFIDENCE}: {r['faces_below_min_confidence']} faces below it, "
              f"{r['others_above_min_confidence']} background or noise crops at or above it")
    return write_results(result, args.out)


if __name__ == "__main__":
    main()
