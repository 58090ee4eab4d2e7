"""How to frame a face's first crop, and whether a second pass pays: measured on real 300-W photos.

    python bench/compare_framings.py [--data ../shared/data/300w_partial] [--weights 300w_cpu] [--detector yunet]

1. On the 300-W training faces (never a test subset): where the detector's five points (eyes, nose tip,
   mouth corners) sit in the face's upright frame (centred on the 68 landmarks' box, rolled by their eye
   line, in units of the box's longer side), their median being a template; and the errors of two ways
   to frame a face from a detection against the landmarks' own frame: the box (``Detection.center``,
   ``size``, ``angle``: the detector's box scaled and shifted by medians over 300-W faces) and a
   similarity fit of the template to the five points.
2. On the common subset (554 photos): inter-ocular NME of ``detect``'s landmarks with one pass on each
   framing and with a second pass re-cut from the first landmarks, with --weights.
Writes bench/results_framings.json.
"""

from __future__ import annotations

import argparse
import glob
import os

from common import machine, write_results

import numpy as np

import lgcn_jax
from data_prep.layout_300w import SUBSETS, read_pts
from lgcn_jax import crop as crop_lib
from lgcn_jax import metrics
from lgcn_jax.detect import landmarks
from lgcn_jax.detectors import get_detector
from lgcn_jax.image_io import load_gray

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def upright_frame(points: np.ndarray) -> tuple[np.ndarray, float, float]:
    """(centre f[2], longer side of the box, roll) of 68 landmarks in their own upright axes."""
    return crop_lib.similarity_params(crop_lib.from_landmarks(points, 1.0, 1), 1)


def in_frame(p: np.ndarray, center: np.ndarray, side: float, angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return (np.asarray(p, np.float64) - center) @ np.array([[c, -s], [s, c]]) / side  # rotated by -angle


def frame_from_points(points: np.ndarray, template: np.ndarray) -> tuple[np.ndarray, float, float]:
    """(centre, longer side, roll) of the landmarks' box: the least-squares similarity mapping ``template`` onto ``points``."""
    a, b = np.asarray(template, np.float64), np.asarray(points, np.float64)
    ac, bc = a - a.mean(0), b - b.mean(0)
    dot, cross = float(np.sum(ac * bc)), float(np.sum(ac[:, 0] * bc[:, 1] - ac[:, 1] * bc[:, 0]))
    scale, angle = np.hypot(dot, cross) / float(np.sum(ac * ac)), float(np.arctan2(cross, dot))
    c, s = np.cos(angle), np.sin(angle)
    return b.mean(0) - scale * (np.array([[c, -s], [s, c]]) @ a.mean(0)), float(scale), angle


def errors(center, side, angle, truth) -> tuple[float, float, float]:
    tc, ts, ta = truth
    return float(np.linalg.norm(center - tc) / ts), float(np.log(side / ts)), float(np.degrees((angle - ta + np.pi) % (2 * np.pi) - np.pi))


def spread(rows) -> dict:
    a = np.abs(np.asarray(rows))
    return {name: {"median": float(np.median(a[:, k])), "p90": float(np.quantile(a[:, k], 0.9))}
            for k, name in enumerate(("center_offset_sides", "log_scale", "roll_deg"))}


def faces(data: str, split: str, limit: int):
    """(gray u8[H, W], landmarks f64[68, 2]) of every face of a split's folders."""
    for sub in SUBSETS[split]:
        files = sorted(glob.glob(os.path.join(data, sub, "*.pts")))
        if not files:
            raise SystemExit(f"no .pts files in {os.path.join(data, sub)}: pass --data DIR (the 300-W folder layout)")
        for pts in files[: limit or None]:
            stem = os.path.splitext(pts)[0]
            image = next((stem + e for e in (".jpg", ".png") if os.path.exists(stem + e)), None)
            if image is not None:
                yield load_gray(image), read_pts(pts).astype(np.float64)


def matched(detector, gray, frame):
    found = [d for d in detector(gray) if d.points is not None and np.linalg.norm(d.center - frame[0]) < 0.3 * frame[1]]
    return min(found, key=lambda d: np.linalg.norm(d.center - frame[0])) if found else None


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=os.path.join(REPO, "..", "shared", "data", "300w_partial"))
    p.add_argument("--weights", default="300w_cpu")
    p.add_argument("--detector", default="yunet", help="a name in lgcn_jax.detectors.DETECTORS whose detections carry five points")
    p.add_argument("--limit", type=int, default=0, help="first N faces of each subset folder (0: all)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results_framings.json"))
    args = p.parse_args(argv)
    detector = get_detector(args.detector)
    local, pairs, missed = [], [], 0
    for gray, truth in faces(args.data, "train", args.limit):
        frame = upright_frame(truth)
        d = matched(detector, gray, frame)
        if d is None:
            missed += 1
            continue
        local.append(in_frame(d.points, *frame))
        pairs.append((d, frame))
    template = np.median(np.stack(local), axis=0)
    result = {"machine": machine(), "data": os.path.abspath(args.data), "detector": args.detector, "weights": args.weights,
              "train_faces": len(local), "train_missed": missed, "template": np.round(template, 4).tolist(),
              "framing_error": {"box": spread([errors(d.center, d.size, d.angle, f) for d, f in pairs]),
                                "five_points": spread([errors(*frame_from_points(d.points, template), f) for d, f in pairs])}}
    model = lgcn_jax.load_pretrained(args.weights)
    size, ratio = model.data.image_size, crop_lib.crop_ratio(model.data.dataset)
    nme = {"box, one pass": [], "box, two passes": [], "five points, one pass": [], "five points, two passes": []}
    common_missed = 0
    for gray, truth in faces(args.data, "common", args.limit):
        d = matched(detector, gray, upright_frame(truth))
        if d is None:
            common_missed += 1
            continue
        c, side, angle = frame_from_points(d.points, template)
        for name, m in (("box", crop_lib.similarity(d.center, d.size * ratio, d.angle, size)),
                        ("five points", crop_lib.similarity(c, side * ratio, angle, size))):
            for refine, passes in ((0, "one pass"), (1, "two passes")):
                (face,) = landmarks(model, [gray], [0], [m], [d.score], refine=refine)
                nme[f"{name}, {passes}"].append(float(metrics.nme(face.landmarks[None], truth[None])[0]))
    result["common"] = {"faces": len(nme["box, one pass"]), "missed": common_missed,
                        "nme": {k: float(np.mean(v)) for k, v in nme.items()},
                        "failure_0.08": {k: float(np.mean(np.asarray(v) > 0.08)) for k, v in nme.items()}}
    print(f"{len(local)} training faces ({missed} missed); framing error against the landmarks' frame (median, p90):")
    for name, r in result["framing_error"].items():
        print(f"  {name:<12} centre {r['center_offset_sides']['median']:.4f} ({r['center_offset_sides']['p90']:.4f}) box sides, "
              f"scale {r['log_scale']['median']:.4f} ({r['log_scale']['p90']:.4f}) log, roll {r['roll_deg']['median']:.2f} "
              f"({r['roll_deg']['p90']:.2f}) degrees")
    print(f"common subset, {args.weights}, {result['common']['faces']} faces:")
    for k, v in result["common"]["nme"].items():
        print(f"  {k:<24} NME {100 * v:.3f}%  failures {100 * result['common']['failure_0.08'][k]:.2f}%")
    return write_results(result, args.out)


if __name__ == "__main__":
    main()
