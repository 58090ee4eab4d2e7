"""How small a face YuNet finds, by the face's size in the image it searches: what ``YuNetDetector(min_face=)`` rests on.

    python bench/yunet_search_size.py [--data ../shared/data/300w_partial]

The 30 scenes of bench/compare_face_detectors.py (300-W faces of 40-250 px pasted on backgrounds at 640x480 and
1920x1080; made there and reused) searched on copies of several sizes; each face is counted in the bucket of its
landmark box's longer side in the searched copy, found when a detection matches it (compare_face_detectors'
rule).  Also the scenes' recall and the ms per image at each search size.  Writes bench/results_yunet_search_size.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from common import machine, write_results

import compare_face_detectors as cfd
import numpy as np

from lgcn_jax.detectors import YuNetDetector
from lgcn_jax.image_io import load_gray

BUCKETS = [(0, 15), (15, 20), (20, 25), (25, 30), (30, 40), (40, 60), (60, 1e9)]
SIDES = (1920, 960, 640, 480, 320)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=os.path.join(cfd.REPO, "..", "shared", "data", "300w_partial"))
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "lgcn_face_detectors"), help="where the scenes are made and kept")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results_yunet_search_size.json"))
    args = p.parse_args(argv)
    tagdir = os.path.join(args.work, cfd.tag(0))
    sets_path = os.path.join(tagdir, "sets.json")
    sets = json.load(open(sets_path)) if os.path.exists(sets_path) else cfd.prepare(args.data, 0, tagdir, None)
    buckets = {b: [0, 0] for b in BUCKETS}
    by_side = {}
    for side in SIDES:
        det = YuNetDetector(max_side=side, coarse_side=0 if side <= 640 else 640)
        found = total = 0
        ms = []
        for scene in sets["scenes"]:
            gray = load_gray(scene["path"])
            t = time.perf_counter()
            dets = det(gray)
            ms.append(1e3 * (time.perf_counter() - t))
            gts = [(np.array(f["center"]), f["size"]) for f in scene["faces"]]
            pairs, _ = cfd.match([[d.center[0], d.center[1], d.size, d.size] for d in dets], gts)
            hit = {j for _, j in pairs}
            found, total = found + len(pairs), total + len(gts)
            factor = min(1.0, side / max(gray.shape))
            for j, (_, size) in enumerate(gts):
                for b in BUCKETS:
                    if b[0] <= size * factor < b[1]:
                        buckets[b][0] += j in hit
                        buckets[b][1] += 1
        by_side[side] = {"recall": found / total, "faces": total, "ms_per_scene": float(np.median(ms))}
    result = {"machine": machine(), "scenes": len(sets["scenes"]), "by_search_side": by_side,
              "recall_by_face_px_in_search": {f"{lo:g}-{hi:g}" if hi < 1e9 else f"{lo:g}+": {"found": f, "faces": n, "recall": f / max(n, 1)}
                                              for (lo, hi), (f, n) in buckets.items()}}
    for side, r in by_side.items():
        print(f"longer side at most {side:>4}: recall {r['recall']:.3f} of {r['faces']} faces, {r['ms_per_scene']:.1f} ms per scene")
    for k, r in result["recall_by_face_px_in_search"].items():
        print(f"faces of {k:>6} px in the searched copy: {r['found']:>3} of {r['faces']:>3} found ({r['recall']:.2f})")
    return write_results(result, args.out)


if __name__ == "__main__":
    main()
