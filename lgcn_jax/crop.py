"""Face crops: the box around a face, the crop itself, and coordinates between crop and image.

Coordinates are (x, y) pixels with pixel centres at integers (pixel i spans
[i - 0.5, i + 0.5]).  A box is (x0, y0, x1, y1) in those coordinates: its
left/top and right/bottom *edges*.  A square box of side s cut into S x S crop
pixels maps crop pixel u to x = x0 + (u + 0.5) * s / S.

The training crop [I]: a square centred on the centre of the landmarks'
bounding box, with side (1 + 2 * margin) * max(width, height), margin 0.2.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from lgcn_jax.landmarks68 import LEFT_EYE, MOUTH_CORNERS, RIGHT_EYE

__all__ = ["CROP_MARGIN", "crop_ratio", "similarity", "similarity_params", "apply_affine", "invert_affine", "reframe", "warp", "landmark_box", "square_box", "crop", "to_crop", "to_original", "from_landmarks", "ffhq_alignment", "ALIGNMENTS"]

CROP_MARGIN = 0.2


# Crop side over the landmarks' extent in each dataset: 300-W crops are cut with the margin
# above; the synthetic generator frames faces itself (0.535 +- 0.076 of the side, measured
# on 200 faces), so its crops are 1 / 0.535 = 1.87 times the extent.
_CROP_RATIOS = {"300w": 1.0 + 2.0 * CROP_MARGIN, "synthetic": 1.87}


def crop_ratio(dataset: str) -> float:
    """Side of a training crop over the longer side of its landmarks' box, for ``dataset``."""
    if dataset not in _CROP_RATIOS:
        raise ValueError(f"no crop framing known for dataset {dataset!r}; known: {sorted(_CROP_RATIOS)}")
    return _CROP_RATIOS[dataset]


def square_box(center: np.ndarray, side: float) -> np.ndarray:
    """f32[4] box (x0, y0, x1, y1) of a square with this centre and side."""
    cx, cy = float(center[0]), float(center[1])
    h = side / 2.0
    return np.array([cx - h, cy - h, cx + h, cy + h], np.float32)


def landmark_box(points: np.ndarray, margin: float = CROP_MARGIN) -> np.ndarray:
    """The training crop box of a face from its landmarks f[L, 2]: f32[4]."""
    p = np.asarray(points, np.float64)
    lo, hi = p.min(0), p.max(0)
    side = (1.0 + 2.0 * margin) * max(float((hi - lo).max()), 1.0)
    return square_box((lo + hi) / 2.0, side)


def to_crop(points, box, size: int) -> np.ndarray:
    """Image coordinates f[..., L, 2] -> coordinates in the size x size crop of ``box`` f[..., 4]."""
    box = np.asarray(box, np.float64)
    scale = (box[..., 2] - box[..., 0]) / size
    origin = box[..., None, :2]
    return ((np.asarray(points, np.float64) - origin) / scale[..., None, None] - 0.5).astype(np.float32)


def to_original(points, box, size: int) -> np.ndarray:
    """Crop coordinates f[..., L, 2] of a size x size crop of ``box`` f[..., 4] -> image coordinates."""
    box = np.asarray(box, np.float64)
    scale = (box[..., 2] - box[..., 0]) / size
    origin = box[..., None, :2]
    return ((np.asarray(points, np.float64) + 0.5) * scale[..., None, None] + origin).astype(np.float32)


def crop(gray: np.ndarray, box, size: int) -> np.ndarray:
    """u8[size, size] crop of a u8[H, W] image inside the square ``box``; outside the image is black."""
    x0, y0, x1, y1 = (float(v) for v in box)
    return warp(gray, similarity(((x0 + x1) / 2.0, (y0 + y1) / 2.0), x1 - x0, 0.0, size), size)

def similarity(center, side: float, angle: float, size: int) -> np.ndarray:
    """f64[2, 3] affine map from crop pixels to image pixels of a square crop.

    The crop is ``side`` image pixels wide, centred on ``center`` and rotated by
    ``angle`` radians (counter-clockwise in (x, y) image axes: a face rolled by
    ``angle`` comes out upright).  With angle 0 it equals the box mapping above.
    """
    s = side / size
    c, si = np.cos(angle) * s, np.sin(angle) * s
    half = (size - 1) / 2.0  # crop pixel centre of the square
    cx, cy = float(center[0]), float(center[1])
    return np.array([[c, -si, cx - c * half + si * half], [si, c, cy - si * half - c * half]])


def similarity_params(matrix: np.ndarray, size: int) -> tuple[np.ndarray, float, float]:
    """(center f[2], side, angle) of a ``similarity`` crop map f[2, 3]: its inverse."""
    center = matrix[:, :2] @ np.full(2, (size - 1) / 2.0) + matrix[:, 2]
    return center, float(np.sqrt(abs(np.linalg.det(matrix[:, :2])))) * size, float(np.arctan2(matrix[1, 0], matrix[0, 0]))


def reframe(matrix: np.ndarray, size: int, ratio: float, new_size: int, new_ratio: float) -> np.ndarray:
    """The same face's crop map for another model: ``matrix`` frames it for ``size`` px crops with side ``ratio``
    x its landmarks' extent; the result has the same centre and roll, ``new_size`` px and side ``new_ratio`` x that
    extent."""
    center, side, angle = similarity_params(matrix, size)
    return similarity(center, side * new_ratio / ratio, angle, new_size)


def apply_affine(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """f32[..., 2] points mapped by a f[2, 3] affine matrix."""
    p = np.asarray(points, np.float64)
    return (p @ matrix[:, :2].T + matrix[:, 2]).astype(np.float32)


def invert_affine(matrix: np.ndarray) -> np.ndarray:
    a = np.linalg.inv(matrix[:, :2])
    return np.concatenate([a, -a @ matrix[:, 2:]], axis=1)


def warp(gray: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
    """u8[size, size] crop whose pixel u shows image point matrix @ (u, 1); outside is black.  An RGB image
    u8[H, W, 3] gives u8[size, size, 3], each channel as the gray one would be.

    Large reductions are box-filtered by an integer factor first, as in ``crop``.  Only the
    part of the image under the crop is read, so a crop of a huge photo costs what its face does.
    """
    gray = np.asarray(gray, np.uint8)
    m = np.asarray(matrix, np.float64).copy()
    scale = float(np.sqrt(abs(np.linalg.det(m[:, :2]))))
    factor = int(scale // 1.5)
    # The region under the crop, widened by the filter's reach and aligned to the reduction grid
    # (so the reduced pixels are those of the whole image): the result is the same.
    corners = apply_affine(m, np.array([[-1.0, -1.0], [size, -1.0], [-1.0, size], [size, size]], np.float64))
    f = max(factor, 1)
    x0 = max(0, int(np.floor(corners[:, 0].min())) - 2 * f) // f * f
    y0 = max(0, int(np.floor(corners[:, 1].min())) - 2 * f) // f * f
    x1 = min(gray.shape[1], int(np.ceil(corners[:, 0].max())) + 2 * f)
    y1 = min(gray.shape[0], int(np.ceil(corners[:, 1].max())) + 2 * f)
    if x1 <= x0 or y1 <= y0:
        return np.zeros((size, size), np.uint8)
    if factor >= 2:  # whole reduction cells only, as Image.reduce of the whole image would have them
        x1 = x0 + max((x1 - x0) // f, 1) * f if x1 < gray.shape[1] else x1
        y1 = y0 + max((y1 - y0) // f, 1) * f if y1 < gray.shape[0] else y1
    im = Image.fromarray(gray[y0:y1, x0:x1])
    m[:, 2] -= (x0, y0)
    # Edge coordinates for PIL: x_edge = x + 0.5 on both sides.
    m_edge = m.copy()
    m_edge[:, 2] = m[:, 2] + 0.5 - 0.5 * (m[:, 0] + m[:, 1])
    if factor >= 2:
        im = im.reduce(factor)
        m_edge = m_edge / factor
    coeffs = (m_edge[0, 0], m_edge[0, 1], m_edge[0, 2], m_edge[1, 0], m_edge[1, 1], m_edge[1, 2])
    out = im.transform((size, size), Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR, fillcolor=0)
    return np.asarray(out, np.uint8)


def from_landmarks(points: np.ndarray, ratio: float, size: int) -> np.ndarray:
    """f64[2, 3] crop map (``similarity``) framing a face as in training, from its 68 landmarks f[68, 2].

    Centred on the centre of the landmarks' box in the face's own upright axes, rolled
    upright by the eye line, with side ``ratio`` x the longer side of that box.
    """
    p = np.asarray(points, np.float64)
    d = p[LEFT_EYE].mean(0) - p[RIGHT_EYE].mean(0)
    angle = float(np.arctan2(d[1], d[0]))
    c, s = np.cos(angle), np.sin(angle)
    upright = p @ np.array([[c, -s], [s, c]])  # rotated by -angle
    lo, hi = upright.min(0), upright.max(0)
    center = np.array([[c, -s], [s, c]]) @ ((lo + hi) / 2.0)  # back to image axes
    return similarity(center, max(float((hi - lo).max()), 1.0) * ratio, angle, size)


def ffhq_alignment(points: np.ndarray, size: int) -> np.ndarray:
    """f64[2, 3] map from the pixels of a size x size crop to image pixels: the FFHQ alignment (Karras et al., CVPR 2019;
    ``align_face`` of NVlabs/ffhq-dataset) from 68 landmarks f[68, 2].

    Its square: centred a tenth of the way from the eyes' midpoint to the mouth's, its top side along the eye line
    turned towards the perpendicular of the eye-to-mouth line, half-side the larger of 2 x the eye distance and
    1.8 x the eye-to-mouth distance.  As FFHQ's ``Image.QUAD`` transform, the crop's outer edges are the square's.
    """
    p = np.asarray(points, np.float64)
    eye_left, eye_right = p[RIGHT_EYE].mean(0), p[LEFT_EYE].mean(0)  # FFHQ's names: the image's left and right
    eye_avg = (eye_left + eye_right) / 2.0
    eye_to_eye = eye_right - eye_left
    eye_to_mouth = p[list(MOUTH_CORNERS)].mean(0) - eye_avg
    x = eye_to_eye - np.flipud(eye_to_mouth) * np.array([-1.0, 1.0])
    x = x / np.hypot(*x) * max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8)
    y = np.flipud(x) * np.array([-1.0, 1.0])
    c = eye_avg + eye_to_mouth * 0.1
    # Crop pixel u (centre u + 0.5 in edge units) shows c - x - y + (u + 0.5) / size * 2x (and so for v along y).
    return np.column_stack([2.0 * x / size, 2.0 * y / size, c - x - y + (x + y) / size])


# Aligned crops by name (lgcn-extract --align).
ALIGNMENTS = {"ffhq": ffhq_alignment}
