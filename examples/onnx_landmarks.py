"""68 landmarks for every face in a photo with ONNX Runtime and OpenCV alone (no JAX).

    lgcn-export 300w_cpu --out lgcn.onnx                   # once, where lgcn_jax is installed
    python examples/onnx_landmarks.py photo.jpg --model lgcn.onnx [--out annotated.png]

Prints one JSON object: per face its box, 68 landmarks ((x, y) pixels of the photo) and their confidence.
The steps are those of lgcn_jax.detect, simply: OpenCV's YuNet finds each face (lgcn_jax/weights ships its
ONNX file; --detector for another copy), its box becomes a first estimate of the landmarks' box as in
lgcn_jax.detectors.YuNetDetector, a crop is cut around it as the network's training crops were (size and
crop ratio from the file's metadata; lgcn_jax.crop.similarity), and the crop is cut again from the
landmarks found (lgcn_jax.crop.from_landmarks) for a second pass.  The landmarks are the file's own
decoding (sub-pixel arg-max); lgcn_jax.decode_numpy fits the shape model to the file's heatmaps too.
Needs: pip install onnxruntime opencv-python-headless numpy.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import cv2
import numpy as np
import onnxruntime as ort

YUNET = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "lgcn_jax", "weights", "face_detection_yunet_2026may.onnx")
# lgcn_jax.detectors.YuNetDetector: the landmarks' box is 0.792 x the longer side of YuNet's box, centred
# 0.130 of that side below the box's centre along the face's own downward axis (medians over 300-W).
FACE_SCALE, FACE_SHIFT = 0.792, 0.130
RIGHT_EYE, LEFT_EYE = slice(36, 42), slice(42, 48)  # the subject's right eye is on the image's left


def similarity(center, side: float, angle: float, size: int) -> np.ndarray:
    """f64[2, 3]: crop pixel (u, v, 1) -> photo pixel of a size x size crop, side pixels wide, rolled by angle."""
    s = side / size
    c, si = np.cos(angle) * s, np.sin(angle) * s
    half = (size - 1) / 2.0
    return np.array([[c, -si, center[0] - c * half + si * half], [si, c, center[1] - si * half - c * half]])


def from_landmarks(points: np.ndarray, ratio: float, size: int) -> np.ndarray:
    """The crop map framing a face from its 68 landmarks f[68, 2]: upright by the eye line, centred on their box."""
    d = points[LEFT_EYE].mean(0) - points[RIGHT_EYE].mean(0)
    angle = float(np.arctan2(d[1], d[0]))
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    upright = points @ rot  # rotated by -angle
    lo, hi = upright.min(0), upright.max(0)
    return similarity(rot @ ((lo + hi) / 2.0), max(float((hi - lo).max()), 1.0) * ratio, angle, size)


def cut(gray: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
    """u8[size, size]: crop pixel u shows photo point matrix @ (u, 1), bilinear; outside the photo is black."""
    scale = float(np.sqrt(abs(np.linalg.det(matrix[:, :2]))))
    factor = int(scale // 1.5)
    if factor >= 2:  # a large reduction: box-filter the photo first, as lgcn_jax.crop.warp does
        gray = cv2.resize(gray, (max(1, gray.shape[1] // factor), max(1, gray.shape[0] // factor)), interpolation=cv2.INTER_AREA)
        matrix = np.concatenate([matrix[:, :2] / factor, (matrix[:, 2:] + 0.5) / factor - 0.5], axis=1)
    return cv2.warpAffine(gray, matrix, (size, size), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def find_faces(gray: np.ndarray, detector: str, score_threshold: float = 0.6) -> list[tuple[np.ndarray, float, float, float]]:
    """(centre f64[2], landmarks' box side, roll angle, score) of each face YuNet finds in u8[H, W]."""
    h, w = gray.shape
    # Padded to multiples of 32 and at least 64 (lgcn_jax.detectors says why); the faces' coordinates do not change.
    ph, pw = max(64, -(-h // 32) * 32), max(64, -(-w // 32) * 32)
    bgr = cv2.copyMakeBorder(np.repeat(gray[..., None], 3, axis=2), 0, ph - h, 0, pw - w, cv2.BORDER_CONSTANT, value=0)
    yunet = cv2.FaceDetectorYN.create(detector, "", (pw, ph), score_threshold, 0.3, 5000)
    _, found = yunet.detect(bgr)
    faces = []
    for row in [] if found is None else found:
        x, y, bw, bh = row[:4]
        eyes = row[4:8].reshape(2, 2)  # YuNet's first two points: the right eye, then the left
        dx, dy = eyes[1] - eyes[0]
        angle = float(np.arctan2(dy, dx))
        side = float(max(bw, bh))
        down = np.array([-np.sin(angle), np.cos(angle)])
        faces.append((np.array([x + bw / 2 - 0.5, y + bh / 2 - 0.5]) + FACE_SHIFT * side * down, FACE_SCALE * side, angle, float(row[14])))
    return faces


def landmarks(session: ort.InferenceSession, gray: np.ndarray, maps: list[np.ndarray], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Landmarks f32[N, 68, 2] in photo pixels and confidence f32[N, 68] of the crops ``maps`` (one batch)."""
    crops = np.stack([cut(gray, m, size) for m in maps])[..., None].astype(np.float32) / 255.0
    points, confidence = session.run(["landmarks", "confidence"], {"images": crops})
    return np.stack([p @ m[:, :2].T + m[:, 2] for p, m in zip(points, maps)]), confidence


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("photo")
    p.add_argument("--model", required=True, help="an ONNX file written by lgcn-export")
    p.add_argument("--detector", default=YUNET, help="YuNet's ONNX file (default: the one in lgcn_jax/weights)")
    p.add_argument("--out", help="also write the photo with the landmarks drawn (PNG, JPEG, ...)")
    args = p.parse_args(argv)
    image = cv2.imread(args.photo, cv2.IMREAD_COLOR)  # EXIF orientation applied, as lgcn_jax.detect does
    if image is None:
        print(f"onnx_landmarks: cannot read {args.photo}", file=sys.stderr)
        return 1
    gray = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    session = ort.InferenceSession(args.model, providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    size, ratio = int(meta["input_size"]), float(meta["crop_ratio"])
    faces = find_faces(gray, args.detector)
    results = []
    if faces:
        maps = [similarity(center, side * ratio, angle, size) for center, side, angle, _ in faces]
        points, _ = landmarks(session, gray, maps, size)
        maps = [from_landmarks(pts, ratio, size) for pts in points]  # the second pass: framed by the landmarks
        points, confidence = landmarks(session, gray, maps, size)
        for (_, _, _, score), pts, conf in zip(faces, points, confidence):
            results.append({"box": np.round(np.concatenate([pts.min(0), pts.max(0)]), 2).tolist(), "score": round(score, 3),
                            "landmarks": np.round(pts, 2).tolist(), "confidence": np.round(conf, 3).tolist()})
            for x, y in pts:
                cv2.circle(image, (round(x), round(y)), max(1, round(image.shape[0] / 400)), (0, 255, 0), -1, cv2.LINE_AA)
    if args.out:
        cv2.imwrite(args.out, image)
    print(json.dumps({"photo": args.photo, "model": meta.get("weights", ""), "faces": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
