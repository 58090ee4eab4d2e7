"""Compare OpenCV's bundled Haar frontal-face cascades as the face detector of `detect`.

    python bench/compare_face_detectors.py

The only real photograph available offline is the one bundled with matplotlib (Grace
Hopper); we paste it into scenes at several sizes, rolls, contrasts and noise levels, and
count found faces (a find within 0.25 face sizes of a true centre), false finds and time,
for each cascade, with and without the +-30 degree search.  Writes bench/results_face_detectors.json.
"""

from __future__ import annotations

import json
import os
import time

from common import machine

import matplotlib
import numpy as np
from PIL import Image, ImageFilter

from lgcn_jax.detect import HaarDetector

PHOTO = os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "sample_data", "grace_hopper.jpg")
CASCADES = ["haarcascade_frontalface_default.xml", "haarcascade_frontalface_alt.xml", "haarcascade_frontalface_alt2.xml",
            "haarcascade_frontalface_alt_tree.xml"]


def scenes(photo: np.ndarray, face_center: np.ndarray, face_size: float):
    """(image, [(centre, size)]) pairs: the photo pasted at several scales and rolls, with nuisances."""
    rng = np.random.default_rng(0)
    layouts = [[(0.5, (170, 170), 0), (0.4, (480, 330), 25), (0.3, (780, 140), -20)],
               [(0.35, (150, 380), 10), (0.25, (420, 120), -10), (0.45, (720, 300), 0)],
               [(0.6, (250, 280), -30), (0.2, (600, 100), 0), (0.3, (700, 400), 15)]]
    out = []
    for k, layout in enumerate(layouts):
        for nuisance in ("clean", "dark", "blur", "noise"):
            canvas = Image.new("L", (900, 560), int(rng.integers(20, 200)))
            truth = []
            for scale, center, deg in layout:
                small = Image.fromarray(photo).resize((int(photo.shape[1] * scale), int(photo.shape[0] * scale)), Image.BILINEAR)
                rot = small.rotate(deg, resample=Image.BILINEAR, expand=True)
                mask = Image.new("L", small.size, 255).rotate(deg, expand=True)
                ox, oy = int(center[0] - rot.width / 2), int(center[1] - rot.height / 2)
                canvas.paste(rot, (ox, oy), mask)
                c = (face_center + 0.5) * scale - 0.5 - np.array([(small.width - 1) / 2, (small.height - 1) / 2])
                t = np.radians(deg)
                c = np.array([[np.cos(t), np.sin(t)], [-np.sin(t), np.cos(t)]]) @ c + np.array([(rot.width - 1) / 2 + ox, (rot.height - 1) / 2 + oy])
                truth.append((c, face_size * scale))
            a = np.asarray(canvas).astype(np.float32)
            if nuisance == "dark":
                a = a * 0.35
            elif nuisance == "blur":
                a = np.asarray(canvas.filter(ImageFilter.GaussianBlur(2.0))).astype(np.float32)
            elif nuisance == "noise":
                a = a + rng.normal(0, 20, a.shape)
            out.append((f"layout{k}-{nuisance}", np.clip(a, 0, 255).astype(np.uint8), truth))
    return out


def main(argv=None) -> dict:
    photo = np.asarray(Image.open(PHOTO).convert("L"))
    (ref,) = HaarDetector(angles=(0.0,))(photo)
    data = scenes(photo, ref.center, ref.size)
    rows = []
    for cascade in CASCADES:
        for angles in ((0.0,), (0.0, -30.0, 30.0)):
            det = HaarDetector(angles=angles, cascade=cascade)
            found = false = total = 0
            t = time.perf_counter()
            for _, img, truth in data:
                dets = det(img)
                hit = [any(np.linalg.norm(d.center - c) < 0.25 * s for c, s in truth) for d in dets]
                found += sum(any(np.linalg.norm(d.center - c) < 0.25 * s for d in dets) for c, s in truth)
                false += hit.count(False)
                total += len(truth)
            dt = (time.perf_counter() - t) / len(data)
            rows.append({"cascade": cascade, "angles": list(angles), "found": found, "faces": total, "false_finds": false, "s_per_image": dt})
            print(f"{cascade:<40} angles {str(angles):<18} found {found:>2}/{total}  false {false:>2}  {dt * 1e3:6.0f} ms/image", flush=True)
    result = {"machine": machine(), "images": len(data), "rows": rows}
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "results_face_detectors.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
