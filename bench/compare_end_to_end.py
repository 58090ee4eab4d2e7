"""Real photos end to end: detect() against landmarks from ground-truth boxes, and against dlib.

    python bench/compare_end_to_end.py --data ../shared/data/300w_partial [--peers] [--limit N]

On the 300-W common subset (HELEN test + LFPW test, 554 faces; each image holds its annotated face
with context twice its size): for each face,
  * gt-box: one network pass on the crop framed from the ground-truth landmarks (the evaluation
    crop: the landmarks' box, side 1.4x), no detector;
  * detect(): the default detector on the whole image, then detect()'s two passes; the annotated
    face is the found face whose landmark-box centre is nearest (within 0.3 face sizes);
  * detect(first_pass=...): the same with the first pass, which only frames the second one's crop,
    by other weights (--first_pass, default 300w_cpu; '' skips it), matched the same way;
  * --peers: dlib's HOG detector (upsample 1) and its 68-point predictor (``pip install
    'lgcn_jax[peers]'``: dlib-bin, face-recognition-models), matched the same way.
Inter-ocular NME (outer eye corners) over found faces; recall = found / annotated.  Also ms per
640x480 photo with one face (the Grace Hopper photo on a canvas), detector and landmarks together.
Writes bench/results_end_to_end.json.
"""

from __future__ import annotations

import argparse
import glob
import os
import time

from common import machine, write_results

import matplotlib
import numpy as np
from PIL import Image

import lgcn_jax
from lgcn_jax import crop as crop_lib
from lgcn_jax import metrics
from lgcn_jax.detect import landmarks
from lgcn_jax.image_io import load_gray
from lgcn_jax.release import PRETRAINED
from data_prep.layout_300w import read_pts

SUBSETS = ("helen/testset", "lfpw/testset")
PHOTO = os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "sample_data", "grace_hopper.jpg")


def nme(points, truth) -> float:
    """Inter-ocular NME of one face's points f[68, 2]."""
    return float(metrics.nme(points[None], truth[None])[0])


def nearest(candidates: list[np.ndarray], truth: np.ndarray):
    """The candidate landmark set that is the annotated face (``metrics.match_face``), or None."""
    k = metrics.match_face(candidates, truth)
    return None if k is None else candidates[k]


def from_ground_truth(model, gray: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Landmarks f32[68, 2] from one pass on the crop framed from the ground truth (the evaluation crop)."""
    size, ratio = model.config.data.image_size, crop_lib.crop_ratio(model.config.data.dataset)
    lo, hi = truth.min(0), truth.max(0)
    box = crop_lib.similarity((lo + hi) / 2, float((hi - lo).max()) * ratio, 0.0, size)
    (face,) = landmarks(model, [gray], [0], [box], [1.0], refine=0)
    return face.landmarks


class Dlib:
    """dlib's HOG detector + 68-point shape predictor (the peer)."""

    def __init__(self, upsample: int = 1):
        import dlib
        import face_recognition_models

        self.dlib, self.upsample = dlib, upsample
        self.detector = dlib.get_frontal_face_detector()
        self.predictor = dlib.shape_predictor(face_recognition_models.pose_predictor_model_location())

    def __call__(self, gray: np.ndarray) -> list[np.ndarray]:
        out = []
        for r in self.detector(gray, self.upsample):
            s = self.predictor(gray, r)
            out.append(np.array([[p.x, p.y] for p in s.parts()], np.float64))
        return out


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


def one_face_640x480_ms(model, repeats: int = 10, first_pass=None) -> float:
    """Median ms of detect() on a 640x480 photo with one face (after a warm-up call)."""
    photo = Image.open(PHOTO).convert("L")
    canvas = Image.new("L", (640, 480), 110)
    small = photo.resize((int(photo.width * 0.75), int(photo.height * 0.75)), Image.BILINEAR)
    canvas.paste(small, (160, 20))
    img = np.asarray(canvas)
    lgcn_jax.detect(img, model, first_pass=first_pass)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        faces = lgcn_jax.detect(img, model, first_pass=first_pass)
        times.append(1e3 * (time.perf_counter() - t))
    assert len(faces) == 1
    return float(np.median(times))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data", "300w_partial"))
    p.add_argument("--peers", action="store_true", help="also dlib end to end (pip install 'lgcn_jax[peers]')")
    p.add_argument("--detector", default="yunet")
    p.add_argument("--first_pass", default="300w_cpu", help="weights of detect()'s first pass for the extra row ('' skips the row)")
    p.add_argument("--limit", type=int, default=0, help="first N faces of each subset (0: all)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results_end_to_end.json"))
    args = p.parse_args(argv)
    model = lgcn_jax.load_pretrained()
    first_pass = lgcn_jax.load_pretrained(args.first_pass) if args.first_pass else None
    peer = Dlib() if args.peers else None
    rows = []
    for sub in SUBSETS:
        files = sorted(glob.glob(os.path.join(args.data, sub, "*.jpg")) + glob.glob(os.path.join(args.data, sub, "*.png")))
        if not files:
            raise SystemExit(f"no images in {os.path.join(args.data, sub)}: pass --data DIR (the 300-W folder layout)")
        for path in files[: args.limit or None]:
            gray = load_gray(path)
            truth = read_pts(os.path.splitext(path)[0] + ".pts")
            row = {"subset": sub, "image": os.path.basename(path), "gt_box": nme(from_ground_truth(model, gray, truth), truth)}
            t = time.perf_counter()
            found = lgcn_jax.detect(gray, model, detector=args.detector)
            row["detect_ms"] = 1e3 * (time.perf_counter() - t)
            match = nearest([f.landmarks for f in found], truth)
            row["detect"] = None if match is None else nme(match, truth)
            if first_pass is not None:
                t = time.perf_counter()
                found = lgcn_jax.detect(gray, model, detector=args.detector, first_pass=first_pass)
                row["first_pass_ms"] = 1e3 * (time.perf_counter() - t)
                match = nearest([f.landmarks for f in found], truth)
                row["first_pass"] = None if match is None else nme(match, truth)
            if peer is not None:
                t = time.perf_counter()
                found = peer(gray)
                row["dlib_ms"] = 1e3 * (time.perf_counter() - t)
                match = nearest(found, truth)
                row["dlib"] = None if match is None else nme(match, truth)
            rows.append(row)
    n = len(rows)
    result = {"machine": machine(), "data": os.path.abspath(args.data), "detector": args.detector, "weights": PRETRAINED,
              "gt_box": summarise(rows, "gt_box", n), "detect": summarise(rows, "detect", n)}
    # The same faces for both: NME of detect() over the faces it found, and gt-box NME over those faces.
    both = [r for r in rows if r["detect"] is not None]
    result["detect_over_gt_box_same_faces"] = float(np.mean([r["detect"] for r in both]) / np.mean([r["gt_box"] for r in both]))
    result["one_face_640x480_ms"] = one_face_640x480_ms(model)
    if first_pass is not None:
        # Paired over the faces both found: the cost of framing the second pass with the other weights.
        both = [r for r in rows if r["detect"] is not None and r["first_pass"] is not None]
        diff = np.array([r["first_pass"] - r["detect"] for r in both])
        result["first_pass"] = {"weights": args.first_pass, **summarise(rows, "first_pass", n),
                                "nme_minus_detect_same_faces": float(diff.mean()),
                                "nme_minus_detect_standard_error": float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else None,
                                "one_face_640x480_ms": one_face_640x480_ms(model, first_pass=first_pass)}
    if peer is not None:
        result["dlib"] = summarise(rows, "dlib", n)
    for key in ("gt_box", "detect", "first_pass", "dlib"):
        if key in result:
            r = result[key]
            ms = f"{r['ms_per_image']:6.1f} ms/image" if r["ms_per_image"] else ""
            print(f"{key:<8} found {r['found']:>3}/{r['faces']} ({100 * r['recall']:.1f}%)  NME {100 * r['nme']:.2f}%  "
                  f"(HELEN {100 * r['nme_by_subset']['helen']:.2f}%, LFPW {100 * r['nme_by_subset']['lfpw']:.2f}%)  {ms}", flush=True)
    print(f"detect / gt-box NME on the same faces: {result['detect_over_gt_box_same_faces']:.3f}; "
          f"640x480 photo with one face: {result['one_face_640x480_ms']:.0f} ms (detector + landmarks)")
    if first_pass is not None:
        r = result["first_pass"]
        print(f"first pass by {args.first_pass}: NME {100 * r['nme_minus_detect_same_faces']:+.3f} +- "
              f"{100 * (r['nme_minus_detect_standard_error'] or 0):.3f} points against detect() on the same faces; "
              f"640x480 photo with one face: {r['one_face_640x480_ms']:.0f} ms")
    return write_results(result, args.out)


if __name__ == "__main__":
    main()
