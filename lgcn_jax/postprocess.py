"""Heatmaps -> landmarks: sub-pixel arg-max, then the PCA shape model fitted to the heatmaps.

The algorithm is the authors' MATLAB post-processing (source [M] in
docs/architecture.md), written from its description in pure jnp so that it
runs under ``jit`` on the device, vmapped over the batch:

1. per-map arg-max with a log-parabola sub-pixel fit;
2. global fit: the in-plane rotation theta from a Kabsch fit of the mean shape
   to the confident points (heatmap value >= 0.1), then the shape coefficients
   b by heatmap-weighted least squares under the training order constraints::

       min_b  sum_l sum_p w_lp^2 || c + R(theta) (mean_l - c + sum_k b_k comp_kl) - p ||^2
       s.t.   (mean + sum_k b_k comp)[lower] <= (mean + sum_k b_k comp)[upper]

   (w_lp: the heatmap value of landmark l at pixel p, 0 at or below 0.01; c the
   image centre).  Expanding the square, the pixel sum collapses to
   W_l = sum_p w_lp^2 and the weighted mean position m_l of each map, so the
   problem is a 12-variable QP over 68 points, not over every pixel;
3. local refits with only the pixels within 20, then 7 pixels of the last fit;
4. blend: final = (1 - v) * fit + v * peak, where peak is the nearest local
   maximum of the map to the fit, refined to sub-pixel, and v its value
   (clipped to [0, 1]): confident maps keep their own peak, doubtful ones
   follow the model.

The QP is solved by a primal-dual interior-point method (Mehrotra
predictor-corrector) with a fixed iteration count, so it compiles to one
static loop; the mean shape (b = 0) is strictly feasible, which gives the
start.  It stops updating once the duality measure falls below 1e-7.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from lgcn_jax.config import PostprocessConfig
from lgcn_jax.heatmaps import argmax_subpixel, refine_flat
from lgcn_jax.shape_model import ShapeModel, empty_shape_model, kabsch_angle, rotate

__all__ = ["postprocess", "postprocess_with_confidence", "solve_qp", "check_heatmaps"]


def solve_qp(hess: jax.Array, grad: jax.Array, a: jax.Array, bound: jax.Array, iterations: int = 30) -> jax.Array:
    """min_x 1/2 x^T hess x + grad^T x  subject to  a x <= bound, by a primal-dual interior point.

    Args:
      hess: f32[K, K] symmetric positive definite; grad: f32[K];
      a: f32[M, K], bound: f32[M] > 0 (x = 0 must be strictly feasible).
    Returns:
      x f32[K].
    """
    k, m = hess.shape[0], a.shape[0]
    # Scaling the objective leaves the minimiser unchanged and keeps the multipliers near 1.
    scale = jnp.trace(hess) / k + 1e-30
    hess, grad = hess / scale, grad / scale
    if m == 0:
        return jnp.linalg.solve(hess, -grad)

    def max_step(v, dv):
        return jnp.min(jnp.where(dv < 0, -v / jnp.where(dv < 0, dv, -1.0), jnp.inf))

    def body(_, carry):
        x, s, lam = carry
        r_dual = hess @ x + grad + a.T @ lam
        r_prim = a @ x + s - bound
        mu = jnp.mean(s * lam)
        chol = jax.scipy.linalg.cho_factor(hess + (a.T * (lam / s)) @ a)

        def direction(r_comp):
            dx = jax.scipy.linalg.cho_solve(chol, -r_dual - a.T @ ((lam * r_prim - r_comp) / s))
            ds = -r_prim - a @ dx
            return dx, ds, (-r_comp - lam * ds) / s

        dx, ds, dl = direction(s * lam)  # predictor: the affine-scaling step
        step = jnp.minimum(1.0, jnp.minimum(max_step(s, ds), max_step(lam, dl)))
        sigma = (jnp.mean((s + step * ds) * (lam + step * dl)) / mu) ** 3
        dx, ds, dl = direction(s * lam + ds * dl - sigma * mu)  # corrector with centring
        step = jnp.minimum(1.0, 0.99 * jnp.minimum(max_step(s, ds), max_step(lam, dl)))
        new = (x + step * dx, s + step * ds, lam + step * dl)
        ok = (mu > 1e-7) & jnp.all(jnp.isfinite(new[0])) & jnp.all(jnp.isfinite(new[1])) & jnp.all(jnp.isfinite(new[2]))
        return tuple(jnp.where(ok, n, o) for n, o in zip(new, carry))

    x0 = jnp.zeros((k,), hess.dtype)
    x, _, _ = lax.fori_loop(0, iterations, body, (x0, bound, jnp.ones((m,), hess.dtype)))
    return x


def _map_statistics(heat: jax.Array, floor: float, window: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """Per-map total squared weight f32[L] and weighted mean position f32[L, 2] of heat f32[H, W, L]."""
    h, w, _ = heat.shape
    wt = jnp.where(heat > floor, heat, 0.0)
    if window is not None:
        wt = wt * window
    w2 = wt * wt
    total = w2.sum((0, 1))
    xs, ys = jnp.arange(w, dtype=heat.dtype), jnp.arange(h, dtype=heat.dtype)
    mx = jnp.einsum("hwl,w->l", w2, xs)
    my = jnp.einsum("hwl,h->l", w2, ys)
    mean = jnp.stack([mx, my], -1) / jnp.maximum(total, 1e-30)[:, None]
    return total, mean


def _values_at(heat: jax.Array, points: jax.Array) -> jax.Array:
    """Heatmap value of each map at its point rounded to the nearest pixel (clipped into the map): f32[L]."""
    h, w, l = heat.shape
    ix = jnp.clip(jnp.round(points[:, 0]).astype(jnp.int32), 0, w - 1)
    iy = jnp.clip(jnp.round(points[:, 1]).astype(jnp.int32), 0, h - 1)
    return heat[iy, ix, jnp.arange(l)]


def _rotation(heat: jax.Array, points: jax.Array, model: ShapeModel, threshold: float) -> jax.Array:
    """Kabsch angle of the mean shape onto the confident points (the most confident 1/threshold+1 if fewer than 2)."""
    conf = _values_at(heat, points)
    certain = conf >= threshold
    fallback = max(4, round(1.0 / threshold)) + 1 if threshold > 0 else conf.shape[0]
    rank = jnp.argsort(jnp.argsort(-conf))
    weights = jnp.where(certain.sum() >= 2, certain, rank < fallback).astype(points.dtype)
    return kabsch_angle(model.mean, points, weights)


def _fit(heat, theta, model: ShapeModel, num_components: int, cfg: PostprocessConfig, window=None):
    """Constrained weighted least-squares fit of the rotated model: f32[L, 2]."""
    h, w, num_l = heat.shape
    center = jnp.array([(w - 1) / 2.0, (h - 1) / 2.0], heat.dtype)
    comps = model.components[:num_components]
    total, target = _map_statistics(heat, cfg.weight_floor, window)
    base = rotate(model.mean, theta, center)
    jac = rotate(comps, theta, jnp.zeros(2, heat.dtype)).reshape(num_components, -1)  # [K, 2L]
    wc = jnp.repeat(total, 2)
    hess = (jac * wc) @ jac.T
    hess = hess + (1e-6 * jnp.trace(hess) / num_components + 1e-12) * jnp.eye(num_components, dtype=heat.dtype)
    grad = jac @ (wc * (base - target).reshape(-1))
    if cfg.constraints:
        flat = comps.reshape(num_components, -1)
        a = flat[:, model.lower].T - flat[:, model.upper].T
        mean = model.mean.reshape(-1)
        bound = mean[model.upper] - mean[model.lower]
    else:
        a, bound = jnp.zeros((0, num_components), heat.dtype), jnp.zeros((0,), heat.dtype)
    coef = solve_qp(hess, grad, a, bound, cfg.solver_iterations)
    return base + jnp.einsum("k,kld->ld", coef, jac.reshape(num_components, num_l, 2))


def _window(shape, points: jax.Array, half: int) -> jax.Array:
    """f32[H, W, L] mask of pixels within ``half`` (Chebyshev) of each map's rounded point."""
    h, w, _ = shape
    cx, cy = jnp.round(points[:, 0]), jnp.round(points[:, 1])
    inx = jnp.abs(jnp.arange(w, dtype=points.dtype)[:, None] - cx) <= half  # [W, L]
    iny = jnp.abs(jnp.arange(h, dtype=points.dtype)[:, None] - cy) <= half  # [H, L]
    return (iny[:, None, :] & inx[None, :, :]).astype(points.dtype)


def _nearest_peak(heat: jax.Array, points: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Nearest local maximum (3x3) of each map to its point, sub-pixel refined: (f32[L, 2], value f32[L])."""
    h, w, num_l = heat.shape
    maps = jnp.transpose(heat, (2, 0, 1))  # [L, H, W]: rows contiguous, twice as fast on CPU as [H, W, L]
    pad = jnp.pad(maps, [(0, 0), (1, 1), (1, 1)], mode="edge")
    rows = [pad[:, :, d : d + w] for d in range(3)]
    hi = functools.reduce(jnp.maximum, rows)
    lo = functools.reduce(jnp.minimum, rows)
    hi = jnp.maximum(jnp.maximum(hi[:, :-2], hi[:, 1:-1]), hi[:, 2:])
    lo = jnp.minimum(jnp.minimum(lo[:, :-2], lo[:, 1:-1]), lo[:, 2:])
    is_peak = (maps >= hi) & (maps > lo)  # a flat neighbourhood is no peak
    xs, ys = jnp.arange(w, dtype=heat.dtype), jnp.arange(h, dtype=heat.dtype)
    d2 = (xs - points[:, 0, None, None]) ** 2 + (ys[:, None] - points[:, 1, None, None]) ** 2
    d2 = jnp.where(is_peak, d2, jnp.inf).reshape(num_l, h * w)
    idx = jnp.argmin(d2, axis=-1)
    found = jnp.isfinite(jnp.min(d2, axis=-1))
    xy, value = refine_flat(maps.reshape(num_l, h * w), h, w, idx // w, idx % w)
    return xy, jnp.where(found, value, 0.0)


def _postprocess_one(heat: jax.Array, model: ShapeModel, cfg: PostprocessConfig) -> tuple[jax.Array, jax.Array]:
    init, peak = argmax_subpixel(heat[None])
    init, peak = init[0], peak[0]
    if not cfg.use_shape_model:
        return init, peak
    num_components = min(cfg.num_components, model.num_components)
    theta = _rotation(heat, init, model, cfg.confidence_threshold)
    fit = _fit(heat, theta, model, num_components, cfg)
    if cfg.local_windows:
        # As in [M], the local refits keep the rotation estimated at the global fit.
        theta = _rotation(heat, fit, model, cfg.confidence_threshold)
        size = heat.shape[0]
        for half in cfg.local_windows:
            half = max(1, round(half * size / 96))
            fit = _fit(heat, theta, model, num_components, cfg, _window(heat.shape, fit, half))
    if not cfg.blend:
        return fit, _values_at(heat, fit)
    peak_xy, value = _nearest_peak(heat, fit)
    v = jnp.clip(value, 0.0, 1.0)[:, None]
    return (1.0 - v) * fit + v * peak_xy, value


def check_heatmaps(shape: tuple[int, ...], model: ShapeModel | None) -> None:
    """Raise a ValueError naming the problem if heatmaps of ``shape`` [B, H, W, L] do not fit the shape model."""
    if len(shape) != 4:
        raise ValueError(f"heatmaps must have shape [B, H, W, L], got {tuple(shape)}")
    if model is None:
        return
    _, h, w, l = shape
    if l != model.num_landmarks:
        raise ValueError(f"heatmaps have {l} channels but the shape model has {model.num_landmarks} landmarks")
    if h != w or h != model.image_size:
        raise ValueError(f"heatmaps are {h}x{w} but the shape model was built for {model.image_size}x{model.image_size} crops")


@functools.partial(jax.jit, static_argnames="config")
def _postprocess(heatmaps, model, config):
    return jax.vmap(lambda hm: _postprocess_one(hm, model, config))(heatmaps)


def postprocess_with_confidence(heatmaps: jax.Array, shape_model: ShapeModel | None, config: PostprocessConfig = PostprocessConfig()):
    """Like ``postprocess``, also returning a per-point confidence f32[B, L]: the heatmap value at the chosen peak."""
    heatmaps = jnp.asarray(heatmaps, jnp.float32)
    check_heatmaps(heatmaps.shape, shape_model)
    if shape_model is None:
        if config.use_shape_model:
            raise ValueError("no shape model given: pass one (lgcn_jax.load_model(...).shape_model) or set postprocess.use_shape_model=False")
        shape_model = empty_shape_model(heatmaps.shape[-1], heatmaps.shape[1])
    return _postprocess(heatmaps, shape_model, config)


def postprocess(heatmaps: jax.Array, shape_model: ShapeModel | None, config: PostprocessConfig = PostprocessConfig()) -> jax.Array:
    """Landmarks f32[B, L, 2] (x, y pixels) from heatmaps f32[B, H, W, L] (jit-compiled, vmapped).

    ``shape_model`` may be None only with ``config.use_shape_model=False`` (arg-max decoding).
    """
    return postprocess_with_confidence(heatmaps, shape_model, config)[0]
