"""68 landmarks for every face in a photo, in its own pixel coordinates.

    faces = lgcn_jax.detect("group.jpg")            # [Face(box, landmarks f32[68, 2], confidence f32[68], ...)]
    python -m lgcn_jax.detect photo1.jpg photo2.png --out results/

Pipeline: grayscale (any mode, EXIF orientation applied, so coordinates are those
of the image as viewers show it) -> face boxes from OpenCV's Haar cascade (it
ships inside the opencv-python-headless wheel; nothing is downloaded), searched at
several in-plane angles -> one square crop per face, framed like the training crops of the model's dataset
(``crop.crop_ratio``) -> ``predict`` on all crops of all images as one batch -> a second pass on crops
re-cut from the first landmarks (centred on their bounding box, rolled upright by
the eye line, side ``crop_ratio`` x its extent: the training framing) -> landmarks
mapped back through each crop's affine map.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Callable, Sequence

import numpy as np

from lgcn_jax import crop as crop_lib
from lgcn_jax.image_io import load_gray, open_image
from lgcn_jax.shape_model import rotate

__all__ = ["Face", "Detection", "HaarDetector", "detect", "detect_batch", "draw", "main"]

RIGHT_EYE, LEFT_EYE = slice(36, 42), slice(42, 48)  # iBUG 0-based: the subject's right eye is on the image's left


@dataclasses.dataclass(frozen=True)
class Detection:
    """A face candidate: the centre and the longer side (``size``, pixels) of the box its 68
    landmarks would span, and its roll ``angle`` in radians (eye line against the x axis)."""

    center: np.ndarray
    size: float
    angle: float = 0.0
    score: float = 1.0


@dataclasses.dataclass(frozen=True)
class Face:
    """One face: ``box`` f32[4] (x0, y0, x1, y1) is the bounding box of the landmarks in
    image pixels; ``landmarks`` f32[68, 2] (x, y), 0-indexed pixel centres; ``confidence``
    f32[68] the heatmap value at each point (about 1 when sure, near 0 when the point was
    placed by the shape model); ``angle`` the face's roll in radians; ``score`` the face
    detector's score; ``crop`` f64[2, 3] the affine map from crop pixels to image pixels.
    """

    box: np.ndarray
    landmarks: np.ndarray
    confidence: np.ndarray
    angle: float
    score: float
    crop: np.ndarray

    def to_dict(self) -> dict:
        return {"box": [round(float(v), 2) for v in self.box], "landmarks": np.round(self.landmarks, 2).tolist(),
                "confidence": np.round(self.confidence, 3).tolist(), "angle_deg": round(float(np.degrees(self.angle)), 2),
                "score": float(self.score)}


class HaarDetector:
    """OpenCV's frontal-face Haar cascade (``haarcascade_frontalface_alt2``), run on the image
    rotated by each of ``angles`` degrees so that rolled faces are found too; overlapping
    finds are merged, keeping the strongest.

    The cascade box covers roughly brows to chin; ``face_scale`` and ``face_shift`` (in box
    sides, downwards) turn it into an estimate of the landmarks' box [our estimate]; the
    second pass of ``detect`` re-cuts the crop from the landmarks, so these need only be close.
    """

    def __init__(self, angles: Sequence[float] = (0.0, -30.0, 30.0), min_size: int = 24, scale_factor: float = 1.1,
                 min_neighbors: int = 4, face_scale: float = 1.0, face_shift: float = 0.08, cascade: str = "haarcascade_frontalface_alt2.xml"):
        try:
            import cv2
        except ImportError as e:  # pragma: no cover - a dependency
            raise ImportError("face detection needs opencv-python-headless (pip install 'opencv-python-headless<5')") from e
        path = os.path.join(cv2.data.haarcascades, cascade)
        self._cv2 = cv2
        self._cascade = cv2.CascadeClassifier(path)
        if self._cascade.empty():
            raise RuntimeError(f"OpenCV could not load its bundled cascade {path}")
        self.angles, self.min_size, self.scale_factor, self.min_neighbors = tuple(angles), min_size, scale_factor, min_neighbors
        self.face_scale, self.face_shift = face_scale, face_shift

    def __call__(self, gray: np.ndarray) -> list[Detection]:
        cv2 = self._cv2
        h, w = gray.shape
        eq = cv2.equalizeHist(gray)
        found = []
        for deg in self.angles:
            # Rotate about the centre onto a canvas that holds the whole image.
            m = cv2.getRotationMatrix2D((w / 2 - 0.5, h / 2 - 0.5), deg, 1.0)
            cos, sin = abs(m[0, 0]), abs(m[0, 1])
            cw, ch = int(np.ceil(h * sin + w * cos)), int(np.ceil(h * cos + w * sin))
            m[0, 2] += cw / 2 - w / 2
            m[1, 2] += ch / 2 - h / 2
            img = eq if deg == 0 else cv2.warpAffine(eq, m, (cw, ch), flags=cv2.INTER_LINEAR, borderValue=0)
            boxes, _, weights = self._cascade.detectMultiScale3(img, scaleFactor=self.scale_factor, minNeighbors=self.min_neighbors,
                                                                minSize=(self.min_size, self.min_size), outputRejectLevels=True)
            back = crop_lib.invert_affine(np.vstack([m, [0, 0, 1]])[:2]) if deg != 0 else np.array([[1.0, 0, 0], [0, 1.0, 0]])
            theta = np.radians(deg)  # upright after a counter-clockwise turn by deg: its eye line is at deg in (x, y-down) axes
            for (x, y, bw, bh), score in zip(np.asarray(boxes).reshape(-1, 4), np.asarray(weights).reshape(-1)):
                c_rot = np.array([x + bw / 2 - 0.5, y + bh / 2 - 0.5 + self.face_shift * bh])
                center = crop_lib.apply_affine(back, c_rot)
                found.append(Detection(center.astype(np.float64), float(bw) * self.face_scale, float(theta), float(score)))
        return _merge(found)


@functools.lru_cache(maxsize=1)
def _default_detector() -> HaarDetector:
    return HaarDetector()


def _merge(dets: list[Detection], overlap: float = 0.5) -> list[Detection]:
    """Greedy non-maximum suppression by centre distance relative to the box size."""
    keep: list[Detection] = []
    for d in sorted(dets, key=lambda d: -d.score):
        if all(np.linalg.norm(d.center - k.center) > overlap * min(d.size, k.size) for k in keep):
            keep.append(d)
    return keep


def _recut(points: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Centre, extent (longer side of the upright landmark box) and roll of a face from its landmarks f[68, 2]."""
    d = points[LEFT_EYE].mean(0) - points[RIGHT_EYE].mean(0)
    angle = float(np.arctan2(d[1], d[0]))
    origin = np.zeros(2)
    upright = rotate(points, -angle, origin, xp=np)
    lo, hi = upright.min(0), upright.max(0)
    center = rotate(((lo + hi) / 2.0)[None], angle, origin, xp=np)[0]  # back to image axes
    return center, max(float((hi - lo).max()), 1.0), angle


def _run(model, crops: np.ndarray, batch_size: int):
    from lgcn_jax.predict import predict_with_confidence

    lms, confs = [], []
    for lo in range(0, len(crops), batch_size):
        chunk = crops[lo:lo + batch_size]
        # Pad to a power of two (at most batch_size): a handful of compiled shapes serve any face count.
        pad = min(batch_size, 1 << (len(chunk) - 1).bit_length()) - len(chunk)
        x = np.concatenate([chunk, np.repeat(chunk[-1:], pad, 0)]) if pad else chunk
        lm, conf = predict_with_confidence(model, x[..., None])
        lms.append(np.asarray(lm)[: len(chunk)])
        confs.append(np.asarray(conf)[: len(chunk)])
    return np.concatenate(lms), np.concatenate(confs)


def detect_batch(images: Sequence, params=None, *, detector: Callable[[np.ndarray], list[Detection]] | None = None,
                 refine: int = 1, batch_size: int = 32) -> list[list[Face]]:
    """``detect`` for many images: every face of every image goes through the network in shared batches."""
    from lgcn_jax.predict import Model, load_pretrained

    model = load_pretrained() if params is None else params
    if not isinstance(model, Model):
        raise TypeError("params must be a lgcn_jax.Model (from load_model / load_pretrained), or None for the released weights")
    size = model.config.data.image_size
    ratio = crop_lib.crop_ratio(model.config.data.dataset)
    detector = _default_detector() if detector is None else detector
    grays = [load_gray(im, exif="apply") for im in images]
    owners, maps, scores = [], [], []
    for i, g in enumerate(grays):
        for d in detector(g):
            owners.append(i)
            maps.append(crop_lib.similarity(d.center, d.size * ratio, d.angle, size))
            scores.append(d.score)
    results: list[list[Face]] = [[] for _ in grays]
    if not owners:
        return results
    for it in range(refine + 1):
        crops = np.stack([crop_lib.warp(grays[o], m, size) for o, m in zip(owners, maps)])
        lm_crop, conf = _run(model, crops, batch_size)
        points = [crop_lib.apply_affine(m, p) for m, p in zip(maps, lm_crop)]
        if it < refine:
            maps = []
            for p in points:
                center, extent, angle = _recut(p)
                maps.append(crop_lib.similarity(center, extent * ratio, angle, size))
    for o, m, p, c, s in zip(owners, maps, points, conf, scores):
        results[o].append(Face(box=np.concatenate([p.min(0), p.max(0)]).astype(np.float32), landmarks=p, confidence=c.astype(np.float32),
                               angle=float(np.arctan2(m[1, 0], m[0, 0])), score=s, crop=m))
    for faces in results:
        faces.sort(key=lambda f: (float(f.box[0]), float(f.box[1])))
    return results


def detect(image, params=None, *, detector: Callable[[np.ndarray], list[Detection]] | None = None, refine: int = 1) -> list[Face]:
    """Landmarks of every face in ``image`` (a path, PIL image or array of any size and mode).

    Args:
      params: a ``Model`` (``lgcn_jax.load_model(path)``); None loads the released weights
        (``load_pretrained``: trained on 300-W, see its docstring).
      detector: gray u8[H, W] -> list of ``Detection``; default ``HaarDetector()``.
      refine: passes re-cut from the previous landmarks (0: trust the detector's box).
    Returns:
      one ``Face`` per face found, left to right; [] when there is none.
    """
    return detect_batch([image], params, detector=detector, refine=refine)[0]


def _rgb(image):
    from PIL import Image, ImageOps

    if isinstance(image, (str, os.PathLike)):
        image = open_image(str(image))
    if isinstance(image, Image.Image):
        image = ImageOps.exif_transpose(image)
        if image.mode in ("RGB", "RGBA", "P", "CMYK", "YCbCr", "L", "LA", "1"):
            return image.convert("RGB")
        return Image.fromarray(load_gray(image, exif="stored")).convert("RGB")
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[-1] in (3, 4) and a.dtype == np.uint8:
        return Image.fromarray(np.ascontiguousarray(a[..., :3]))
    return Image.fromarray(load_gray(a)).convert("RGB")


def draw(image, faces: Sequence[Face], radius: float | None = None):
    """An RGB PIL image with every face's box and landmarks (green = confident, red = placed by the model)."""
    from PIL import ImageDraw

    im = _rgb(image)
    d = ImageDraw.Draw(im)
    for f in faces:
        r = radius or max(1.5, float(f.box[2] - f.box[0]) / 60)
        d.rectangle([float(v) for v in f.box], outline=(255, 200, 0), width=max(1, int(r / 1.5)))
        for (x, y), c in zip(f.landmarks, f.confidence):
            c = float(np.clip(c, 0, 1))
            d.ellipse([x - r, y - r, x + r, y + r], fill=(int(255 * (1 - c)), int(255 * c), 60))
    return im


def main(argv=None) -> int:
    """lgcn-detect IMAGE... --out DIR: a JSON and an annotated PNG per image."""
    import argparse
    import json
    import sys

    from tqdm.auto import tqdm

    p = argparse.ArgumentParser(prog="lgcn-detect", description="68 facial landmarks for every face in each image.")
    p.add_argument("images", nargs="+")
    p.add_argument("--out", required=True, help="folder for NAME.json and NAME_landmarks.png")
    p.add_argument("--checkpoint", help="a checkpoint folder (default: the released weights, see lgcn_jax.load_pretrained)")
    p.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    p.add_argument("--no_progress", action="store_true")
    args = p.parse_args(argv)
    from lgcn_jax.checkpoint import CheckpointError
    from lgcn_jax.image_io import ImageError
    from lgcn_jax.predict import load_model, load_pretrained
    from lgcn_jax.shape_model import ShapeModelError

    try:
        model = load_model(args.checkpoint) if args.checkpoint else load_pretrained()
    except (CheckpointError, ShapeModelError) as e:
        print(f"lgcn-detect: error: {e}", file=sys.stderr)
        return 1
    os.makedirs(args.out, exist_ok=True)
    names, seen = [], {}
    for path in args.images:
        stem = os.path.splitext(os.path.basename(path))[0]
        seen[stem] = seen.get(stem, 0) + 1
        names.append(stem if seen[stem] == 1 else f"{stem}_{seen[stem]}")
    if not args.overwrite:
        clash = [n for n in names if os.path.exists(os.path.join(args.out, n + ".json"))]
        if clash:
            print(f"lgcn-detect: error: {args.out} already holds results for {', '.join(clash[:5])}; nothing was written. "
                  "Use another --out or --overwrite.", file=sys.stderr)
            return 1
    failed = 0
    for path, name in tqdm(list(zip(args.images, names)), disable=args.no_progress, unit="image"):
        try:
            image = open_image(path)  # decoded once for detection and drawing
            faces = detect(image, model)
        except ImageError as e:
            print(f"lgcn-detect: skipped {path}: {e}", file=sys.stderr)
            failed += 1
            continue
        with open(os.path.join(args.out, name + ".json"), "w") as f:
            json.dump({"image": os.path.abspath(path), "faces": [face.to_dict() for face in faces]}, f, indent=1)
        draw(image, faces).save(os.path.join(args.out, name + "_landmarks.png"))
        print(f"{path}: {len(faces)} face(s)")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
