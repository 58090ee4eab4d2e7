"""Where YuNet's five points sit in the frame of the landmarks, measured on the 300-W training faces.

    python bench/calibrate_five_points.py [--data ../shared/data/300w_partial] [--max_side 320]

For every training face (afw, helen/trainset, lfpw/trainset; never a test subset) the detector's five
points (eyes, nose tip, mouth corners) are expressed in the face's own upright frame: centred on the
centre of the 68 landmarks' box, rolled by their eye line, in units of the box's longer side (the frame
``crop.from_landmarks`` cuts the second pass's crop in).  Their median over the faces is the template
``lgcn_jax.detectors.FIVE_POINT_TEMPLATE``; a similarity fit of the template to a detection's points
then frames the face without a first pass (``detect``'s ``framing="points"``).  Also the errors of the
two framings on the same faces, against the landmarks' own frame (centre offset and scale error in units
of the box side, roll in degrees): the box framing of ``Detection.center/size/angle`` and the fit.
Writes bench/results_five_points.json.
"""

from __future__ import annotations

import argparse
import glob
import os

from common import machine, write_results

import numpy as np

from data_prep.layout_300w import SUBSETS, read_pts
from lgcn_jax import crop as crop_lib
from lgcn_jax.detectors import FIVE_POINT_TEMPLATE, YuNetDetector, frame_from_points
from lgcn_jax.image_io import load_gray

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def upright_frame(points: np.ndarray) -> tuple[np.ndarray, float, float]:
    """(centre f[2], longer side of the box, roll) of 68 landmarks in their own upright axes."""
    center, side, angle = crop_lib.similarity_params(crop_lib.from_landmarks(points, 1.0, 1), 1)
    return center, side, angle


def in_frame(p: np.ndarray, center: np.ndarray, side: float, angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return (np.asarray(p, np.float64) - center) @ np.array([[c, -s], [s, c]]) / side  # rotated by -angle


def errors(center, side, angle, truth) -> tuple[float, float, float]:
    tc, ts, ta = truth
    return float(np.linalg.norm(center - tc) / ts), float(np.log(side / ts)), float(np.degrees((angle - ta + np.pi) % (2 * np.pi) - np.pi))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=os.path.join(REPO, "..", "shared", "data", "300w_partial"))
    p.add_argument("--max_side", type=int, default=1920, help="YuNet's search size (the detector's max_side)")
    p.add_argument("--limit", type=int, default=0, help="first N faces of each subset (0: all)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results_five_points.json"))
    args = p.parse_args(argv)
    detector = YuNetDetector(max_side=args.max_side)
    local, truths, boxes, fits = [], [], [], []
    missed = 0
    for sub in SUBSETS["train"]:
        files = sorted(glob.glob(os.path.join(args.data, sub, "*.pts")))
        if not files:
            raise SystemExit(f"no .pts files in {os.path.join(args.data, sub)}: pass --data DIR (the 300-W folder layout)")
        for pts in files[: args.limit or None]:
            stem = os.path.splitext(pts)[0]
            image = next((stem + e for e in (".jpg", ".png") if os.path.exists(stem + e)), None)
            if image is None:
                continue
            truth = read_pts(pts).astype(np.float64)
            frame = upright_frame(truth)
            found = [d for d in detector(load_gray(image)) if d.points is not None
                     and np.linalg.norm(d.center - frame[0]) < 0.3 * frame[1]]
            if not found:
                missed += 1
                continue
            d = min(found, key=lambda d: np.linalg.norm(d.center - frame[0]))
            local.append(in_frame(d.points, *frame))
            truths.append(frame)
            boxes.append(errors(d.center, d.size, d.angle, frame))
            fits.append(d)
    template = np.median(np.stack(local), axis=0)
    fit_errors = [errors(*frame_from_points(d.points, template), t) for d, t in zip(fits, truths)]

    def spread(rows):
        a = np.abs(np.asarray(rows))
        return {name: {"median": float(np.median(a[:, k])), "p90": float(np.quantile(a[:, k], 0.9))}
                for k, name in enumerate(("center_offset_sides", "log_scale", "roll_deg"))}

    result = {"machine": machine(), "data": os.path.abspath(args.data), "faces": len(local), "missed": missed, "max_side": args.max_side,
              "template": np.round(template, 4).tolist(), "template_in_library": np.asarray(FIVE_POINT_TEMPLATE).tolist(),
              "box_framing_error": spread(boxes), "five_point_framing_error": spread(fit_errors)}
    print(f"{len(local)} training faces ({missed} missed by the detector); template (x, y in box sides, upright, from the box centre):")
    for name, (x, y) in zip(("eye (image left)", "eye (image right)", "nose tip", "mouth corner (left)", "mouth corner (right)"), template):
        print(f"  {name:<22} {x:+.4f} {y:+.4f}")
    for name in ("box_framing_error", "five_point_framing_error"):
        r = result[name]
        print(f"{name:<26} centre {r['center_offset_sides']['median']:.4f} (p90 {r['center_offset_sides']['p90']:.4f}) sides, "
              f"scale {r['log_scale']['median']:.4f} (p90 {r['log_scale']['p90']:.4f}) log, roll {r['roll_deg']['median']:.2f} "
              f"(p90 {r['roll_deg']['p90']:.2f}) degrees")
    return write_results(result, args.out)


if __name__ == "__main__":
    main()
