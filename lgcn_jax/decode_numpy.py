"""Heatmaps -> landmarks in plain NumPy: ``postprocess`` for runtimes without JAX (ONNX Runtime, LiteRT).

    heatmaps, _, _ = session.run(None, {"images": crops})           # an lgcn-export file
    landmarks, confidence = decode_numpy.decode(heatmaps, model.shape_model, model.postprocess)

The same algorithm as ``lgcn_jax.postprocess`` (its docstring has the steps and their sources), written
face by face in float64: sub-pixel arg-max, rotation, constrained fit of the PCA shape model to the whole
maps and to windows around the last fit, blend with the nearest local maximum.  The exported graphs carry
the arg-max and the confidence; the fit needs a Cholesky solve and an interior-point loop, which neither
ONNX nor LiteRT has, so it runs here.  The landmarks agree with ``predict``'s to float rounding
(tests/test_export.py; within 0.05 px is asserted).  Only NumPy is imported.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from lgcn_jax.config import PostprocessConfig

__all__ = ["decode", "shape_arrays", "argmax_subpixel", "local_maxima", "solve_qp", "log_parabola_offset", "quadratic_fit_matrix"]

# The constants of lgcn_jax.postprocess: pixels of a 96-pixel map searched first for the blend's peak do not
# change its result (the whole map is searched here), so only the window sizes matter.
_REFERENCE_SIZE = 96


def _scaled(pixels: int, size: int) -> int:
    return max(1, round(pixels * size / _REFERENCE_SIZE))


def shape_arrays(shape_model: Any) -> dict[str, np.ndarray]:
    """mean f64[L, 2], components f64[K, L, 2], lower / upper i64[M] of a ``ShapeModel`` or of a mapping that
    holds them (``np.load("shape_model.npz")``)."""
    get = shape_model.__getitem__ if hasattr(shape_model, "__getitem__") else lambda k: getattr(shape_model, k)
    return {"mean": np.asarray(get("mean"), np.float64), "components": np.asarray(get("components"), np.float64),
            "lower": np.asarray(get("lower"), np.int64), "upper": np.asarray(get("upper"), np.int64)}


@functools.lru_cache(maxsize=16)
def quadratic_fit_matrix(radius: int) -> np.ndarray:
    """f64[6, (2r+1)^2]: least-squares coefficients (1, x, y, x^2, xy, y^2) of a quadratic from the samples of a
    (2r+1)^2 window in row-major order, at offsets -r..r from its centre (``heatmaps.refine_at``'s window fit)."""
    d = np.arange(-radius, radius + 1, dtype=np.float64)
    y, x = (a.reshape(-1) for a in np.meshgrid(d, d, indexing="ij"))
    fit = np.linalg.pinv(np.stack([np.ones_like(x), x, y, x * x, x * y, y * y], -1))
    fit.flags.writeable = False  # shared by every caller
    return fit


def log_parabola_offset(left, mid, right, xp=np):
    """Sub-pixel offset of a peak from three samples, fitting a parabola to their logs (NumPy, or jnp as ``xp``).

    A Gaussian is a parabola in log space, so this is exact for a Gaussian peak
    and within 0.07 px for the LGCN kernel (tests); values are floored at a
    small fraction of the peak so the log stays finite, and the offset is
    clipped to half a pixel (the arg-max already found the nearest pixel).
    """
    floor = xp.maximum(mid, 1e-20) * 1e-6
    lg, m, r = (xp.log(xp.maximum(v, floor)) for v in (left, mid, right))
    curvature = lg - 2.0 * m + r
    ok = (curvature < 0) & (mid > 0)
    offset = 0.5 * (lg - r) / xp.where(ok, curvature, -1.0)
    return xp.where(ok, xp.clip(offset, -0.5, 0.5), 0.0)


def _refine_at(heat: np.ndarray, iy: np.ndarray, ix: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray]:
    """``heatmaps.refine_at`` of one face: heat f[H, W, L], pixels i[L] -> (x, y) f64[L, 2], values f64[L]."""
    h, w, num_l = heat.shape
    maps = np.arange(num_l)

    def at(y, x):
        return heat[np.clip(y, 0, h - 1), np.clip(x, 0, w - 1), maps]

    peak = at(iy, ix)
    left = np.where(ix > 0, at(iy, ix - 1), at(iy, ix + 1))
    right = np.where(ix < w - 1, at(iy, ix + 1), left)
    up = np.where(iy > 0, at(iy - 1, ix), at(iy + 1, ix))
    down = np.where(iy < h - 1, at(iy + 1, ix), up)
    xy = np.stack([ix + log_parabola_offset(left, peak, right), iy + log_parabola_offset(up, peak, down)], -1)
    radius = min(int(radius), (h - 1) // 2, (w - 1) // 2)
    if radius > 1:
        cy, cx = np.clip(iy, radius, h - 1 - radius), np.clip(ix, radius, w - 1 - radius)
        d = np.arange(-radius, radius + 1)
        rows = cy[None, :] + np.repeat(d, 2 * radius + 1)[:, None]  # [n*n, L], the window row-major
        cols = cx[None, :] + np.tile(d, 2 * radius + 1)[:, None]
        values = heat[rows, cols, maps]
        top = values.max(0, keepdims=True)
        logs = np.log(np.maximum(values / np.where(top > 0, top, 1.0), 1e-6))
        _, b, c, dxx, dxy, dyy = quadratic_fit_matrix(radius) @ logs
        det = 4.0 * dxx * dyy - dxy * dxy
        safe = np.where(det > 0, det, 1.0)
        ox, oy = (dxy * c - 2.0 * dyy * b) / safe, (dxy * b - 2.0 * dxx * c) / safe
        ok = (dxx < 0) & (dyy < 0) & (det > 0) & (top[0] > 0) & (np.abs(ox) <= radius) & (np.abs(oy) <= radius)
        xy = np.where(ok[:, None], np.stack([cx + ox, cy + oy], -1), xy)
    return xy, peak


def argmax_subpixel(heat: np.ndarray, radius: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """``heatmaps.argmax_subpixel`` of one face: heat f[H, W, L] -> (x, y) f64[L, 2] and peak values f64[L]."""
    h, w, num_l = heat.shape
    flat = np.argmax(heat.reshape(h * w, num_l), axis=0)  # the first maximum in row-major order
    return _refine_at(heat, flat // w, flat % w, radius)


def local_maxima(heat: np.ndarray) -> np.ndarray:
    """bool[H, W, L]: pixels >= their 3x3 neighbours (edge replicated) and > at least one of them."""
    h, w = heat.shape[:2]
    padded = np.pad(heat, [(1, 1), (1, 1), (0, 0)], mode="edge")
    # Separable: over 3 rows, then over 3 columns.
    hi = np.maximum(np.maximum(padded[:h], padded[1:h + 1]), padded[2:])
    lo = np.minimum(np.minimum(padded[:h], padded[1:h + 1]), padded[2:])
    hi = np.maximum(np.maximum(hi[:, :w], hi[:, 1:w + 1]), hi[:, 2:])
    lo = np.minimum(np.minimum(lo[:, :w], lo[:, 1:w + 1]), lo[:, 2:])
    return (heat >= hi) & (heat > lo)


def _kabsch_angle(source: np.ndarray, target: np.ndarray, weights: np.ndarray) -> float:
    """``shape_model.kabsch_angle``: the rotation of centred source f[L, 2] onto centred target, weights f[L]."""
    wsum = max(weights.sum(), 1e-12)
    a = source - (weights[:, None] * source).sum(0) / wsum
    b = target - (weights[:, None] * target).sum(0) / wsum
    return float(np.arctan2((weights * (a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0])).sum(), (weights * (a * b).sum(1)).sum()))


def _rotate(points: np.ndarray, theta: float, center: np.ndarray) -> np.ndarray:
    c, s = np.cos(theta), np.sin(theta)
    return (points - center) @ np.array([[c, s], [-s, c]]) + center


def _values_at(heat: np.ndarray, points: np.ndarray) -> np.ndarray:
    h, w, num_l = heat.shape
    ix = np.clip(np.round(points[:, 0]).astype(np.int64), 0, w - 1)
    iy = np.clip(np.round(points[:, 1]).astype(np.int64), 0, h - 1)
    return heat[iy, ix, np.arange(num_l)]


def _rotation(heat, points, mean, threshold: float) -> float:
    conf = _values_at(heat, points)
    certain = conf >= threshold
    fallback = max(4, round(1.0 / threshold)) + 1 if threshold > 0 else conf.shape[0]
    rank = np.argsort(np.argsort(-conf, kind="stable"), kind="stable")
    weights = certain if certain.sum() >= 2 else rank < fallback
    return _kabsch_angle(mean, points, weights.astype(np.float64))


def _statistics(w2: np.ndarray, around: np.ndarray | None, half: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-map total squared weight f64[L] and weighted mean position f64[L, 2] from the squared weights
    w2 f64[L, H, W] (0 at or below the floor); with ``around`` f[L, 2], of the pixels within ``half``
    (Chebyshev) of each map's rounded point."""
    num_l, h, w = w2.shape
    if around is None:
        rows, cols = w2.sum(2), w2.sum(1)  # [L, H], [L, W]
    else:
        span = 4.0 * (h + w)  # far-off or non-finite points stay off the map, as postprocess._rounded keeps them
        p = np.clip(np.nan_to_num(np.round(around), nan=-span, posinf=span, neginf=-span), -span, span)
        near_x = (np.abs(np.arange(w) - p[:, :1]) <= half).astype(w2.dtype)  # [L, W]
        near_y = (np.abs(np.arange(h) - p[:, 1:]) <= half).astype(w2.dtype)  # [L, H]
        rows = (w2 @ near_x[:, :, None])[..., 0] * near_y  # the window's row sums, one batched product per axis
        cols = (near_y[:, None, :] @ w2)[:, 0, :] * near_x
    total = rows.sum(1)
    mean = np.stack([cols @ np.arange(w, dtype=w2.dtype), rows @ np.arange(h, dtype=w2.dtype)], -1)
    return total, mean / np.maximum(total, 1e-30)[:, None]


def solve_qp(hess: np.ndarray, grad: np.ndarray, a: np.ndarray, bound: np.ndarray, iterations: int = 30) -> np.ndarray:
    """``postprocess.solve_qp``: min_x 1/2 x^T hess x + grad^T x subject to a x <= bound (x = 0 strictly feasible).

    hess f[K, K] symmetric positive definite, grad f[K], a f[M, K], bound f[M] -> x f64[K]: the unconstrained
    minimiser where it meets every constraint, else a primal-dual interior point (Mehrotra predictor-corrector).
    """
    k = hess.shape[0]
    scale = np.trace(hess) / k + 1e-30  # keeps the multipliers near 1; the minimiser is the same
    hess, grad = hess / scale, grad / scale
    free = np.linalg.solve(hess, -grad)
    if a.shape[0] == 0 or (np.all(a @ free <= bound) and np.all(np.isfinite(free))):
        return free

    def max_step(v, dv):
        return np.min(np.where(dv < 0, -v / np.where(dv < 0, dv, -1.0), np.inf))

    x, s, lam = np.zeros(k), bound.astype(np.float64), np.ones(a.shape[0])
    for _ in range(iterations):
        mu = np.mean(s * lam)
        if not mu > 1e-7:
            break
        r_dual = hess @ x + grad + a.T @ lam
        r_prim = a @ x + s - bound
        system = hess + (a.T * (lam / s)) @ a

        def direction(r_comp):
            dx = np.linalg.solve(system, -r_dual - a.T @ ((lam * r_prim - r_comp) / s))
            ds = -r_prim - a @ dx
            return dx, ds, (-r_comp - lam * ds) / s

        dx, ds, dl = direction(s * lam)  # predictor: the affine-scaling step
        step = min(1.0, max_step(s, ds), max_step(lam, dl))
        sigma = (np.mean((s + step * ds) * (lam + step * dl)) / mu) ** 3
        dx, ds, dl = direction(s * lam + ds * dl - sigma * mu)  # corrector with centring
        step = min(1.0, 0.99 * min(max_step(s, ds), max_step(lam, dl)))
        new = (x + step * dx, s + step * ds, lam + step * dl)
        if not all(np.all(np.isfinite(v)) for v in new):
            break
        x, s, lam = new
    return x


def _fit(w2, theta: float, shape: dict, num_components: int, cfg: PostprocessConfig, around=None, half: int = 0) -> np.ndarray:
    """The rotated shape model fitted to the maps' squared weights w2 f64[L, H, W] (within ``half`` of ``around``
    f[L, 2] if given): f64[L, 2]."""
    num_l, h, w = w2.shape
    center = np.array([(w - 1) / 2.0, (h - 1) / 2.0])
    comps = shape["components"][:num_components]
    total, target = _statistics(w2, around, half)
    base = _rotate(shape["mean"], theta, center)
    jac = _rotate(comps, theta, np.zeros(2)).reshape(num_components, -1)  # [K, 2L]
    wc = np.repeat(total, 2)
    hess = (jac * wc) @ jac.T
    hess = hess + (1e-6 * np.trace(hess) / num_components + 1e-12) * np.eye(num_components)
    grad = jac @ (wc * (base - target).reshape(-1))
    if cfg.constraints:
        flat, mean = comps.reshape(num_components, -1), shape["mean"].reshape(-1)
        lower, upper = shape["lower"], shape["upper"]
        a, bound = flat[:, lower].T - flat[:, upper].T, mean[upper] - mean[lower]
    else:
        a, bound = np.zeros((0, num_components)), np.zeros((0,))
    coef = solve_qp(hess, grad, a, bound, cfg.solver_iterations)
    return base + np.einsum("k,kld->ld", coef, jac.reshape(num_components, num_l, 2))


def _nearest_peak(heat: np.ndarray, points: np.ndarray, fit_radius: int) -> tuple[np.ndarray, np.ndarray]:
    """The nearest local maximum of each map to its point (the first in row-major order among equals), sub-pixel
    refined: (x, y) f64[L, 2], value f64[L] (0 for a map without any)."""
    num_l = heat.shape[2]
    ys, xs, ls = np.nonzero(local_maxima(heat))  # row-major order
    d2 = (xs - points[ls, 0]) ** 2 + (ys - points[ls, 1]) ** 2
    order = np.lexsort((np.arange(len(ls)), d2, ls))  # by map, then distance, then row-major position
    maps, first = np.unique(ls[order], return_index=True)
    iy, ix = np.zeros(num_l, np.int64), np.zeros(num_l, np.int64)  # no maximum: pixel (0, 0), as postprocess has it
    iy[maps], ix[maps] = ys[order[first]], xs[order[first]]
    xy, value = _refine_at(heat, iy, ix, fit_radius)
    found = np.zeros(num_l, bool)
    found[maps] = True
    return xy, np.where(found, value, 0.0)


def _decode_one(heat: np.ndarray, shape: dict | None, cfg: PostprocessConfig) -> tuple[np.ndarray, np.ndarray]:
    size = heat.shape[0]
    fit_radius = _scaled(cfg.peak_fit_radius, size) if cfg.peak_fit_radius > 1 else 1
    init, peak = argmax_subpixel(heat, fit_radius)
    if shape is None:
        return init, peak
    num_components = min(cfg.num_components, shape["components"].shape[0])
    w2 = np.square(np.where(heat > cfg.weight_floor, heat, 0.0)).transpose(2, 0, 1)  # map-major: contiguous rows
    theta = _rotation(heat, init, shape["mean"], cfg.confidence_threshold)
    fit = _fit(w2, theta, shape, num_components, cfg)
    if cfg.local_windows:
        theta = _rotation(heat, fit, shape["mean"], cfg.confidence_threshold)  # kept through the local refits, as in [M]
        for half in cfg.local_windows:
            fit = _fit(w2, theta, shape, num_components, cfg, fit, _scaled(half, size))
    if not cfg.blend:
        return fit, _values_at(heat, fit)
    peak_xy, value = _nearest_peak(heat, fit, fit_radius)
    v = np.clip(value, 0.0, 1.0)[:, None]
    return (1.0 - v) * fit + v * peak_xy, value


def decode(heatmaps: np.ndarray, shape_model: Any = None, config: PostprocessConfig = PostprocessConfig()) -> tuple[np.ndarray, np.ndarray]:
    """``postprocess_with_confidence`` in NumPy.

    Args:
      heatmaps: f32[B, H, W, L] (square maps, as the network gives them).
      shape_model: a ``ShapeModel``, or a mapping holding its arrays (``np.load("shape_model.npz")``); may be
        None only with ``config.use_shape_model=False`` (sub-pixel arg-max decoding).
      config: the model's ``PostprocessConfig`` (``Model.postprocess``); ``flip_test`` belongs to the network
        pass and is not read here.
    Returns:
      landmarks f32[B, L, 2] ((x, y) pixels of the maps) and confidence f32[B, L] (the heatmap value at each point).
    """
    heatmaps = np.asarray(heatmaps, np.float32)
    if heatmaps.ndim != 4:
        raise ValueError(f"heatmaps must have shape [B, H, W, L], got {heatmaps.shape}")
    shape = None
    if config.use_shape_model:
        if shape_model is None:
            raise ValueError("no shape model given: pass one (model.shape_model, or np.load('shape_model.npz')) or set "
                             "use_shape_model=False")
        shape = shape_arrays(shape_model)
        if shape["mean"].shape != (heatmaps.shape[-1], 2):
            raise ValueError(f"heatmaps have {heatmaps.shape[-1]} maps but the shape model has {shape['mean'].shape[0]} landmarks")
    # Rounding as the network made them, arithmetic in float64.
    faces = [_decode_one(heat.astype(np.float64), shape, config) for heat in heatmaps]
    landmarks = np.stack([f[0] for f in faces]) + np.array([config.x_offset, 0.0])
    return landmarks.astype(np.float32), np.stack([f[1] for f in faces]).astype(np.float32)
