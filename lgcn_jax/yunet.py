"""YuNet, OpenCV zoo's 53k-parameter face detector (MIT licence, Shiqi Yu), in JAX.

The same network and decoding as ``cv2.FaceDetectorYN`` with the ONNX file shipped in
``lgcn_jax/weights`` (agreement measured on real photos: raw heads within 6e-6, boxes within
1e-4 px, same detections), as pure functions: batched and jit-compiled next to LGCN, on a GPU too.

    params = load_params()                       # the shipped weights (lgcn_jax/weights/yunet_2026may.npz)
    heads = apply(params, images)                # f32[B, H, W, 3] BGR 0..255, H and W multiples of 32
    boxes, points, scores = decode(heads_of_one_image, (H, W))

Network (read from the ONNX graph): a 3x3 stride-2 stem, 13 "1x1 conv -> 3x3 depthwise ->
ReLU" units with 2x2 max-pools, features at strides 8, 16, 32 joined top-down (nearest
upsampling, add, one more unit), and per stride four heads (class, objectness, box, 5 points),
each a 1x1 then 3x3 depthwise conv.  BatchNorm is folded into the convs of the export.

Decoding as OpenCV's ``FaceDetectorYN`` (opencv/modules/objdetect/src/face_detect.cpp): score
sqrt(cls * obj); anchor (column c, row r) of stride s gives centre ((c + dx) s, (r + dy) s),
size (exp(dw) s, exp(dh) s), point k ((c + kx) s, (r + ky) s); non-maximum suppression on the
boxes truncated to integers (IoU > 0.3 suppresses), run only when more than one face passes.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["WEIGHTS", "ONNX", "ONNX_GRAY", "load_params", "apply", "decode", "decode_numpy"]

_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
WEIGHTS = os.path.join(_DIR, "yunet_2026may.npz")
ONNX = os.path.join(_DIR, "face_detection_yunet_2026may.onnx")
# The same network for one (gray) input channel: the stem's weights summed over the three
# (data_prep/convert_yunet.py --gray); what detectors.YuNetDetector runs through OpenCV.
ONNX_GRAY = os.path.join(_DIR, "face_detection_yunet_2026may_gray.onnx")
STRIDES = (8, 16, 32)
_HEADS = {"cls": ("multi_level_cls", 1), "obj": ("multi_level_obj", 1), "bbox": ("multi_level_bbox", 4), "kps": ("multi_level_kps", 10)}


@functools.lru_cache(maxsize=2)
def _load(path: str) -> dict:
    with np.load(path) as d:
        return {k: jnp.asarray(d[k], jnp.float32) for k in d.files}


def load_params(path: str = WEIGHTS) -> dict:
    """Conv weights (HWIO) and biases by layer name, as written by ``data_prep/convert_yunet.py``."""
    return _load(os.path.abspath(path))


def _unit(p: dict, name: str, x: jax.Array, relu: bool = True) -> jax.Array:
    """1x1 conv, then 3x3 depthwise conv (padding 1) [, ReLU]: the depthwise conv as nine shifted
    multiply-adds, 4x faster than a grouped ``conv_general_dilated`` on CPU (same result)."""
    x = jnp.einsum("bhwc,co->bhwo", x, p[name + ".pw.w"][0, 0]) + p[name + ".pw.b"]
    h, w = x.shape[1], x.shape[2]
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    k = p[name + ".dw.w"]
    y = p[name + ".dw.b"]
    for i in range(3):
        for j in range(3):
            y = y + xp[:, i : i + h, j : j + w, :] * k[i, j, 0]
    return jax.nn.relu(y) if relu else y


def _pool(x):
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


def _up(x):  # ONNX Resize, nearest, scale 2
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


@jax.jit
def apply(params: dict, images: jax.Array) -> dict:
    """Raw heads of YuNet.

    Args:
      images: f32[B, H, W, 3] BGR in 0..255 (a gray image repeated 3 times works as well), H, W multiples of 32.
    Returns:
      {"cls_8": f32[B, A8, 1], "obj_8", "bbox_8": [B, A8, 4], "kps_8": [B, A8, 10], ... for strides 16 and 32},
      anchors in row-major order of the stride-s grid.
    """
    p = params
    x = lax.conv_general_dilated(images.astype(jnp.float32), p["backbone.model0.conv1.w"], (2, 2), ((1, 1), (1, 1)),
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
    x = jax.nn.relu(x + p["backbone.model0.conv1.b"])
    x = _pool(_unit(p, "backbone.model0.conv2", x))
    for name in ("backbone.model1.conv1", "backbone.model1.conv2", "backbone.model2.conv1", "backbone.model2.conv2"):
        x = _unit(p, name, x)
    x3 = _unit(p, "backbone.model3.conv2", _unit(p, "backbone.model3.conv1", _pool(x)))
    x4 = _unit(p, "backbone.model4.conv2", _unit(p, "backbone.model4.conv1", _pool(x3)))
    x5 = _unit(p, "backbone.model5.conv2", _unit(p, "backbone.model5.conv1", _pool(x4)))
    n2 = _unit(p, "neck.lateral_convs.2", x5)
    n1 = _unit(p, "neck.lateral_convs.1", x4 + _up(n2))
    n0 = _unit(p, "neck.lateral_convs.0", x3 + _up(n1))
    out = {}
    for kind, (key, channels) in _HEADS.items():
        for level, (s, feat) in enumerate(zip(STRIDES, (n0, n1, n2))):
            y = _unit(p, f"bbox_head.{key}.{level}", feat, relu=False).reshape(feat.shape[0], -1, channels)
            out[f"{kind}_{s}"] = jax.nn.sigmoid(y) if kind in ("cls", "obj") else y
    return out


def _anchors(h: int, w: int):
    cols, rows, strides = [], [], []
    for s in STRIDES:
        r, c = np.meshgrid(np.arange(h // s), np.arange(w // s), indexing="ij")
        rows.append(r.ravel())
        cols.append(c.ravel())
        strides.append(np.full(r.size, s))
    return tuple(np.concatenate(a).astype(np.float32) for a in (cols, rows, strides))


def _raw_decode(heads: dict, h: int, w: int, xp):
    """Every anchor of one image: boxes f32[A, 4] (x, y, w, h), points f32[A, 5, 2], scores f32[A]."""
    cat = lambda k: xp.concatenate([xp.asarray(heads[f"{k}_{s}"]).reshape(-1, _HEADS[k][1]) for s in STRIDES], axis=0)  # noqa: E731
    cls, obj, bb, kp = cat("cls")[:, 0], cat("obj")[:, 0], cat("bbox"), cat("kps")
    c, r, s = (xp.asarray(a) for a in _anchors(h, w))
    score = xp.sqrt(xp.clip(cls, 0.0, 1.0) * xp.clip(obj, 0.0, 1.0))
    bw, bh = xp.exp(bb[:, 2]) * s, xp.exp(bb[:, 3]) * s
    boxes = xp.stack([(c + bb[:, 0]) * s - bw / 2, (r + bb[:, 1]) * s - bh / 2, bw, bh], axis=1)
    points = xp.stack([(kp[:, 0::2] + c[:, None]) * s[:, None], (kp[:, 1::2] + r[:, None]) * s[:, None]], axis=2)
    return boxes.astype(xp.float32), points.astype(xp.float32), score.astype(xp.float32)


def _overlap(a, b, xp):
    """IoU of integer boxes (x, y, w, h), as OpenCV's ``rectOverlap``."""
    x1, y1 = xp.maximum(a[..., 0], b[..., 0]), xp.maximum(a[..., 1], b[..., 1])
    iw = xp.minimum(a[..., 0] + a[..., 2], b[..., 0] + b[..., 2]) - x1
    ih = xp.minimum(a[..., 1] + a[..., 3], b[..., 1] + b[..., 3]) - y1
    inter = xp.where((iw > 0) & (ih > 0), iw * ih, 0)
    total = a[..., 2] * a[..., 3] + b[..., 2] * b[..., 3]
    return xp.where(total > 0, inter.astype(xp.float32) / xp.where(total > 0, total - inter, 1).astype(xp.float32), 1.0)


def decode_numpy(heads: dict, image_hw: tuple[int, int], score_threshold: float = 0.6, nms_threshold: float = 0.3, top_k: int = 5000):
    """``decode`` on the host for any number of candidates (its fallback)."""
    heads = {k: np.asarray(v, np.float32) for k, v in heads.items()}
    boxes, points, score = _raw_decode(heads, *image_hw, np)
    sel = np.nonzero(score >= np.float32(score_threshold))[0]
    boxes, points, score = boxes[sel], points[sel], score[sel]
    if len(sel) <= 1:
        return boxes, points, score
    ib = np.trunc(boxes).astype(np.int64)
    cand = np.nonzero(score > np.float32(score_threshold))[0]
    keep: list[int] = []
    for i in cand[np.argsort(-score[cand], kind="stable")][:top_k]:
        if all(_overlap(ib[i], ib[j], np) <= np.float32(nms_threshold) for j in keep):
            keep.append(i)
    keep = np.asarray(keep, np.int64)
    return boxes[keep], points[keep], score[keep]


@functools.partial(jax.jit, static_argnames=("image_hw", "max_candidates"))
def _decode_fixed(heads, image_hw, score_threshold, nms_threshold, max_candidates):
    boxes, points, score = _raw_decode(heads, *image_hw, jnp)
    k = min(max_candidates, score.shape[0])
    thr = jnp.float32(score_threshold)
    # OpenCV keeps a lone face at score >= threshold; with several, NMS takes those > threshold.
    cand = jnp.where(jnp.sum(score >= thr) > 1, score > thr, score >= thr)
    n_cand = jnp.sum(cand)
    order = jnp.argsort(jnp.where(cand, -score, jnp.inf), stable=True)[:k]
    b, pts, sc = boxes[order], points[order], score[order]
    ib = jnp.trunc(b).astype(jnp.int32)
    suppresses = _overlap(ib[:, None, :], ib[None, :, :], jnp) > jnp.float32(nms_threshold)

    def body(i, keep):
        return keep.at[i].set(~jnp.any(keep & suppresses[i]) & (i < n_cand))

    keep = lax.fori_loop(0, k, body, jnp.zeros(k, bool))
    return b, pts, sc, keep, n_cand > k


def decode(heads: dict, image_hw: tuple[int, int], score_threshold: float = 0.6, nms_threshold: float = 0.3, max_candidates: int = 256):
    """Faces of one image from its heads (``apply``'s output without the batch axis, or with a batch of 1).

    Returns:
      boxes f32[N, 4] (x, y, w, h), points f32[N, 5, 2] (the subject's right eye, left eye, nose tip,
      right and left mouth corners; the right eye is on the image's left), scores f32[N], by falling score.
      Decoded on the device with a fixed candidate count; more than ``max_candidates`` above the
      threshold falls back to the host (``decode_numpy``), so the result never depends on it.
    """
    heads = {k: (v[0] if v.ndim == 3 else v) for k, v in heads.items()}
    b, pts, sc, keep, overflow = _decode_fixed(heads, tuple(int(v) for v in image_hw), score_threshold, nms_threshold, max_candidates)
    if bool(overflow):
        return decode_numpy(heads, image_hw, score_threshold, nms_threshold)
    keep = np.asarray(keep)
    return np.asarray(b)[keep], np.asarray(pts)[keep], np.asarray(sc)[keep]
