"""Face detectors for ``detect``: gray u8[H, W] -> list of ``Detection``, chosen by name.

    detect(photo, detector="yunet")        # default: YuNet through OpenCV (weights shipped in lgcn_jax/weights)
    detect(photo, detector="yunet-jax")    # the same network in JAX (lgcn_jax.yunet), batched and jit-compiled
    detect(photo, detector="haar")         # OpenCV's Haar cascade, searched at 0 and +-30 degrees
    detect(photo, detector="dlib")         # dlib's HOG detector (pip install 'lgcn_jax[peers]')
    detect(photo, detector=my_function)    # any gray u8[H, W] -> list[Detection]

A ``Detection`` estimates the box the face's 68 landmarks would span (centre and longer side)
and its roll; ``detect`` cuts the first crop from it and re-cuts from the landmarks after,
so it needs only be close.  Each detector's box is turned into that estimate with a scale
and a downward shift measured on the 300-W training faces (bench/compare_face_detectors.py
prints them).  Every detector runs on a copy reduced to at most ``max_side`` pixels, so a
photo of any size is searched in bounded memory and time; the crops are cut from the
full-resolution image.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Callable, Sequence, Union

import cv2
import numpy as np

from lgcn_jax import crop as crop_lib
from lgcn_jax import yunet
from lgcn_jax.machine import defaults

__all__ = ["YUNET_RELIABLE_FACE", "Detection", "FaceDetector", "HaarDetector", "YuNetDetector", "DlibDetector", "DETECTORS", "get_detector", "reduce_image", "fit_to_cells"]


@dataclasses.dataclass(frozen=True)
class Detection:
    """A face candidate: the centre and the longer side (``size``, pixels) of the box its 68
    landmarks would span, and its roll ``angle`` in radians (eye line against the x axis).
    ``points`` f64[5, 2], where the detector gives them (YuNet): the eyes (image-left first), the
    nose tip and the mouth corners (image-left first), in image pixels."""

    center: np.ndarray
    size: float
    angle: float = 0.0
    score: float = 1.0
    points: np.ndarray | None = None


FaceDetector = Callable[[np.ndarray], list[Detection]]


def _padded(n: int, cell: int) -> int:
    """A side of n pixels zero-padded to whole cells of YuNet's coarsest stride, as its input (at least 64)."""
    return max(64, -(-n // cell) * cell)


def _reduced_shape(h: int, w: int, max_side: int) -> tuple[int, int]:
    f = max_side / max(h, w)
    return (h, w) if f >= 1.0 else (max(1, round(h * f)), max(1, round(w * f)))


# How much smaller than asked a searched copy may be made to save YuNet a row or column of padding cells.
CELL_FIT_SHRINK = 0.025


def fit_to_cells(h: int, w: int, max_side: int, cell: int = 32) -> int:
    """``max_side`` for ``reduce_image`` of an h x w image, made up to ``CELL_FIT_SHRINK`` smaller where the copy
    then pads to fewer ``cell``-pixel rows or columns (YuNet pads its input to whole cells of its stride 32 and
    costs the padded area): 400x300 searched at 300x225 pads to 320x256, at 299x224 to 320x224, 12% less work
    for faces 0.4% smaller.  The smallest padded area wins, the larger copy among equals."""
    best, best_area = max_side, None
    for side in range(max_side, max(1, int(np.ceil(max_side * (1.0 - CELL_FIT_SHRINK)))) - 1, -1):
        rh, rw = _reduced_shape(h, w, side)
        area = _padded(rh, cell) * _padded(rw, cell)
        if best_area is None or area < best_area:
            best, best_area = side, area
    return best


def reduce_image(gray: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    """A copy of u8[H, W] with its longer side at most ``max_side`` (area-averaged), and the factor applied."""
    h, w = gray.shape[:2]
    if max(h, w) <= max_side:
        return gray, 1.0
    rh, rw = _reduced_shape(h, w, max_side)
    return cv2.resize(gray, (rw, rh), interpolation=cv2.INTER_AREA), max_side / max(h, w)


def _rescale(dets: list[Detection], factor: float) -> list[Detection]:
    """Detections on a copy reduced by ``factor`` -> full-image pixels (pixel centres at integers)."""
    if factor == 1.0:
        return dets
    return [dataclasses.replace(d, center=(np.asarray(d.center) + 0.5) / factor - 0.5, size=d.size / factor,
                                points=None if d.points is None else (np.asarray(d.points) + 0.5) / factor - 0.5) for d in dets]


def _merge(dets: list[Detection], overlap: float = 0.5) -> list[Detection]:
    """Greedy non-maximum suppression by centre distance relative to the box size."""
    keep: list[Detection] = []
    for d in sorted(dets, key=lambda d: -d.score):
        if all(np.linalg.norm(d.center - k.center) > overlap * min(d.size, k.size) for k in keep):
            keep.append(d)
    return keep


# The landmark-box side (pixels of the searched image) from which YuNet finds nearly every face: on composed
# scenes of 300-W faces it found 99% of those of 60 px and more, 90% at 40-60 px, 56% at 25-30 px
# (bench/yunet_search_size.py; in finer buckets over more search sizes 98.5% at 60-70, 93% at 50-60).
YUNET_RELIABLE_FACE = 60.0
# OpenCV detectors a YuNetDetector keeps, one per input size (a few MB each).
_OPENCV_SIZES = 4


class YuNetDetector:
    """YuNet (OpenCV zoo, MIT licence; ``lgcn_jax/weights``): a 53k-parameter CNN with 5 face points.

    Runs through ``cv2.FaceDetectorYN`` (``backend="opencv"``; the network made for one gray channel,
    ``yunet.ONNX_GRAY``) or the JAX port ``lgcn_jax.yunet`` (``backend="jax"``: the same network, the
    gray levels in its three channels; jit-compiled, so the first call at each image size, padded to a
    multiple of 128, compiles; the wider zero padding can move a face at the bottom or right edge
    slightly).  The image is searched on a copy scaled so that a face of ``min_face`` pixels (its
    landmark box) has ``YUNET_RELIABLE_FACE`` pixels (never enlarged), and of at most ``max_side``
    pixels: smaller faces are found less often, and the search costs the copy's area, padded to whole
    32-pixel cells (the copy is made up to 2.5% smaller where that saves a row or column of cells:
    ``fit_to_cells``).  The roll comes from the two eye points; the landmark box is ``face_scale`` x
    the longer box side, shifted down by ``face_shift`` box sides (medians over the 2566 300-W faces).
    YuNet misses faces larger than ~500 px, so a photo over 1.25 x ``coarse_side`` is also searched on
    a copy of at most ``coarse_side`` (0: never), and the two lists merged.
    """

    def __init__(self, score_threshold: float = 0.6, nms_threshold: float = 0.3, max_side: int = 1920, backend: str = "opencv",
                 face_scale: float = 0.792, face_shift: float = 0.130, coarse_side: int = 640, min_face: float = 40.0):
        if backend not in ("opencv", "jax"):
            raise ValueError(f"backend must be 'opencv' or 'jax', got {backend!r}")
        if min_face <= 0:
            raise ValueError(f"min_face is a face size in pixels, got {min_face}")
        self.score_threshold, self.nms_threshold, self.max_side, self.backend = score_threshold, nms_threshold, max_side, backend
        self.face_scale, self.face_shift, self.coarse_side, self.min_face = face_scale, face_shift, coarse_side, min_face
        self._cv: dict[tuple[int, int], object] = {}  # OpenCV detectors by input size, most recently used last

    def _faces(self, gray: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """YuNet's boxes, points and scores for a gray u8[H, W] (what the zoo's network gives for its levels in all three channels)."""
        h, w = gray.shape[:2]
        if self.backend == "jax":
            # Zero-padded at the bottom and right as OpenCV does (to multiples of 32), but to multiples of
            # 128 so that photos of many sizes share a few compiled programs.
            ph, pw = _padded(h, 128), _padded(w, 128)
            x = np.zeros((1, ph, pw, 3), np.float32)
            x[0, :h, :w] = gray[..., None]
            return yunet.decode(yunet.apply(yunet.load_params(), x), (ph, pw), self.score_threshold, self.nms_threshold)
        # OpenCV zero-pads to multiples of 32 itself, but where a side pads to only 32 (one cell of the
        # stride-32 head) its output depends on memory left by earlier calls: a flat 7x300 image gave
        # "faces" at score 1.0 in some calls and none in others.  Padding such sides to 64 ourselves
        # gives the same output every time; larger inputs are padded as OpenCV would.
        ph, pw = _padded(h, 32), _padded(w, 32)
        if (ph, pw) != (h, w):
            gray = cv2.copyMakeBorder(gray, 0, ph - h, 0, pw - w, cv2.BORDER_CONSTANT, value=0)
        # One OpenCV detector per input size: a new size re-allocates the whole network (about 1.5 ms at 320x256,
        # more than the search itself costs), and a large photo's two searches alternate between two sizes.
        cv = self._cv.pop((pw, ph), None)
        if cv is None:
            # The gray network (yunet.ONNX_GRAY) reads the one channel: the same detections as the zoo's file on
            # the gray image repeated into three, 11-14% faster.
            cv = cv2.FaceDetectorYN.create(yunet.ONNX_GRAY, "", (pw, ph), self.score_threshold, self.nms_threshold, 5000)
            if len(self._cv) >= _OPENCV_SIZES:
                del self._cv[next(iter(self._cv))]  # the least recently used
        self._cv[(pw, ph)] = cv
        _, faces = cv.detect(gray)
        if faces is None:
            return np.zeros((0, 4), np.float32), np.zeros((0, 5, 2), np.float32), np.zeros((0,), np.float32)
        return faces[:, :4], faces[:, 4:14].reshape(-1, 5, 2), faces[:, 14]

    def __call__(self, gray: np.ndarray) -> list[Detection]:
        gray = np.ascontiguousarray(gray, np.uint8)
        scale = min(1.0, YUNET_RELIABLE_FACE / self.min_face)
        found = self._search(gray, min(self.max_side, max(1, round(max(gray.shape) * scale))))
        if self.coarse_side and max(gray.shape) > 1.25 * self.coarse_side:
            # YuNet misses faces whose landmark box exceeds ~500 px of the searched copy (measured on a photo
            # upscaled step by step); a second search on a small copy finds those.
            found = _merge(found + self._search(gray, self.coarse_side))
        return found

    def _search(self, gray: np.ndarray, max_side: int) -> list[Detection]:
        small, factor = reduce_image(gray, fit_to_cells(gray.shape[0], gray.shape[1], max_side, 128 if self.backend == "jax" else 32))
        boxes, points, scores = self._faces(small)
        out = []
        for (x, y, bw, bh), pts, score in zip(boxes, points, scores):
            side = float(max(bw, bh))
            if not (np.all(np.isfinite(pts)) and np.isfinite([x, y]).all() and 1.0 <= side <= 4 * max(small.shape)):
                continue  # a degenerate box (OpenCV gave some on a 7-pixel-high image before _faces padded it to 64)
            eyes = pts[1] - pts[0]
            angle = float(np.arctan2(eyes[1], eyes[0]))
            # The shift is along the face's own downward axis.
            down = np.array([-np.sin(angle), np.cos(angle)])
            center = np.array([x + bw / 2 - 0.5, y + bh / 2 - 0.5]) + self.face_shift * side * down
            out.append(Detection(center.astype(np.float64), side * self.face_scale, angle, float(score), np.asarray(pts, np.float64)))
        return _rescale(out, factor)


class HaarDetector:
    """OpenCV's frontal-face Haar cascade (``haarcascade_frontalface_alt2``), run on the image
    rotated by each of ``angles`` degrees so that rolled faces are found too; overlapping
    finds are merged, keeping the strongest.

    The cascade box covers roughly brows to chin; ``face_scale`` and ``face_shift`` (in box
    sides, downwards) turn it into an estimate of the landmarks' box (medians on the 300-W
    training faces: 0.889 and 0.156).
    """

    def __init__(self, angles: Sequence[float] = (0.0, -30.0, 30.0), min_size: int = 24, scale_factor: float = 1.1,
                 min_neighbors: int = 4, face_scale: float = 0.889, face_shift: float = 0.156, cascade: str = "haarcascade_frontalface_alt2.xml",
                 max_side: int = 1280):
        path = os.path.join(cv2.data.haarcascades, cascade)
        self._cascade = cv2.CascadeClassifier(path)
        if self._cascade.empty():
            raise RuntimeError(f"OpenCV could not load its bundled cascade {path}")
        self.angles, self.min_size, self.scale_factor, self.min_neighbors = tuple(angles), min_size, scale_factor, min_neighbors
        self.face_scale, self.face_shift, self.max_side = face_scale, face_shift, max_side

    def __call__(self, gray: np.ndarray) -> list[Detection]:
        small, factor = reduce_image(np.asarray(gray, np.uint8), self.max_side)
        h, w = small.shape
        eq = cv2.equalizeHist(small)
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
        return _rescale(_merge(found), factor)


class DlibDetector:
    """dlib's HOG + linear SVM frontal face detector (``pip install 'lgcn_jax[peers]'``: dlib-bin).

    ``upsample`` doubles the image that many times first (finds faces down to ~40 px instead of
    ~80 px, 4x slower each).  Box to landmark box as for YuNet (``face_scale``, ``face_shift``;
    300-W training faces, upsample 1: 1.025 and 0.115).
    """

    def __init__(self, upsample: int = 1, max_side: int = 1280, face_scale: float = 1.025, face_shift: float = 0.115):
        try:
            import dlib
        except ImportError as e:
            raise ImportError("the 'dlib' detector needs dlib: pip install 'lgcn_jax[peers]' (dlib-bin)") from e
        self._detector = dlib.get_frontal_face_detector()
        self.upsample, self.max_side, self.face_scale, self.face_shift = upsample, max_side, face_scale, face_shift

    def __call__(self, gray: np.ndarray) -> list[Detection]:
        small, factor = reduce_image(np.asarray(gray, np.uint8), self.max_side)
        rects, scores, _ = self._detector.run(np.ascontiguousarray(small), self.upsample, 0.0)
        out = []
        for r, s in zip(rects, scores):
            side = float(max(r.width(), r.height()))
            center = np.array([(r.left() + r.right()) / 2.0, (r.top() + r.bottom()) / 2.0 + self.face_shift * side])
            out.append(Detection(center, side * self.face_scale, 0.0, float(s)))
        return _rescale(out, factor)


DETECTORS: dict[str, Callable[[], FaceDetector]] = {
    "yunet": YuNetDetector,
    "yunet-fast": functools.partial(YuNetDetector, min_face=80.0),  # faces from ~80 px (dlib HOG's floor), at half the cost
    "yunet-jax": functools.partial(YuNetDetector, backend="jax"),
    "haar": HaarDetector,
    "dlib": DlibDetector,
}


@functools.lru_cache(maxsize=8)
def _named(name: str) -> FaceDetector:
    return DETECTORS[name]()


def get_detector(detector: Union[str, FaceDetector, None] = None) -> FaceDetector:
    """A detector from its name in ``DETECTORS`` (None: this machine's, ``lgcn_jax.machine``), or ``detector``
    itself if callable."""
    if detector is None:
        detector = defaults().detector
    if callable(detector):
        return detector
    if detector not in DETECTORS:
        raise ValueError(f"unknown face detector {detector!r}; choose one of {sorted(DETECTORS)} or pass a function gray u8[H, W] -> list[Detection]")
    return _named(detector)
