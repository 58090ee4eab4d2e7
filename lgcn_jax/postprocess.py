"""Heatmaps -> landmarks: sub-pixel arg-max, then the PCA shape model fitted to the heatmaps.

The algorithm is the authors' MATLAB post-processing (source [M] in
docs/architecture.md), written from its description in pure jnp so that it
runs under ``jit`` on the device, vmapped over the batch:

1. per-map arg-max, refined to sub-pixel (ours: a quadratic fitted by least squares to
   the log heatmap over a window around it, ``postprocess.peak_fit_radius``; 1 gives a
   3-point log-parabola along x and y);
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

The QP's unconstrained minimiser is taken when it meets every order
constraint; otherwise a primal-dual interior-point method (Mehrotra
predictor-corrector) solves it, started at the strictly feasible mean shape
(b = 0) and stopped once the duality measure falls below 1e-7.

Single faces are fast (about 2.4 ms on 2 CPU cores; 1.8 ms with 3-point peaks): the window fits and the
peak search read one small patch per map (``lax.dynamic_slice``), and the two
fall-backs (interior point; whole-map peak search when the patch cannot prove
its answer) sit behind ``lax.cond``, which only an unbatched face skips, so
``postprocess_batch`` loops over faces on the CPU instead of vmapping them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from lgcn_jax.config import PostprocessConfig
from lgcn_jax.heatmaps import argmax_subpixel, first_argmax, refine_at
from lgcn_jax.shape_model import ShapeModel, empty_shape_model, kabsch_angle, rotate

__all__ = ["postprocess", "postprocess_with_confidence", "solve_qp", "cholesky", "cho_solve", "check_heatmaps", "peak_fit_radius",
           "decode_peaks"]

# Pixels (of a 96-pixel map) around the fit searched first for the nearest peak; the result
# does not depend on it (a miss searches the whole map), only the speed does.  With the
# released weights on 200 common-subset faces, the farthest peak of a face was 9.1 px away.
PEAK_SEARCH_RADIUS = 12


def cholesky(a: jax.Array) -> jax.Array:
    """Lower Cholesky factor f32[K, K] of a small symmetric positive definite f32[K, K] (NaN where it is not).

    Written out (K is the shape model's few components) instead of LAPACK's: the compiled post-processing
    then calls no library routine, so its executable can be stored and loaded as it is
    (``lgcn_jax.executables``).  A loop over the columns, not K unrolled steps: the decoding calls it in
    every fit, and unrolled it made most of the program's kernels (compile and load time)."""
    k = a.shape[-1]
    rows = jnp.arange(k)

    def column(j, low):
        # Columns j.. of ``low`` are still zero, so full-row products sum over the first j columns only.
        d = jnp.sqrt(a[j, j] - low[j] @ low[j])
        below = (a[:, j] - low @ low[j]) / d
        return low.at[:, j].set(jnp.where(rows > j, below, jnp.where(rows == j, d, 0.0)))

    return lax.fori_loop(0, k, column, jnp.zeros_like(a))


def cho_solve(low: jax.Array, b: jax.Array) -> jax.Array:
    """x f32[K] with (low low^T) x = b, from ``cholesky``'s factor: forward then back substitution."""
    k = low.shape[-1]
    # Entries not yet solved are zero, so full-row products sum over the solved ones only.
    def forward(i, y):
        return y.at[i].set((b[i] - low[i] @ y) / low[i, i])

    y = lax.fori_loop(0, k, forward, jnp.zeros_like(b))

    def back(t, x):
        i = k - 1 - t
        return x.at[i].set((y[i] - low[:, i] @ x) / low[i, i])

    return lax.fori_loop(0, k, back, jnp.zeros_like(b))


def solve_qp(hess: jax.Array, grad: jax.Array, a: jax.Array, bound: jax.Array, iterations: int = 30) -> jax.Array:
    """min_x 1/2 x^T hess x + grad^T x  subject to  a x <= bound.

    The unconstrained minimiser is returned when it satisfies every constraint (on real
    300-W heatmaps it does for every global fit measured); otherwise a primal-dual
    interior point (Mehrotra predictor-corrector, at most ``iterations`` steps, stopping
    once the duality measure is below 1e-7).  Unbatched (``jit`` of one face) only the
    branch taken runs; under ``vmap`` both do and the result is selected.

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
    free = cho_solve(cholesky(hess), -grad)
    if m == 0:
        return free
    feasible = jnp.all(a @ free <= bound) & jnp.all(jnp.isfinite(free))
    return lax.cond(feasible, lambda: free, lambda: _interior_point(hess, grad, a, bound, iterations))


def _interior_point(hess, grad, a, bound, iterations):
    """``solve_qp`` by a primal-dual interior point started at the strictly feasible x = 0."""
    k, m = hess.shape[0], a.shape[0]

    def max_step(v, dv):
        return jnp.min(jnp.where(dv < 0, -v / jnp.where(dv < 0, dv, -1.0), jnp.inf))

    def running(carry):
        i, (_, s, lam), ok = carry
        return (i < iterations) & ok & (jnp.mean(s * lam) > 1e-7)

    def body(carry):
        i, (x, s, lam), _ = carry
        r_dual = hess @ x + grad + a.T @ lam
        r_prim = a @ x + s - bound
        mu = jnp.mean(s * lam)
        chol = cholesky(hess + (a.T * (lam / s)) @ a)

        def direction(r_comp):
            dx = cho_solve(chol, -r_dual - a.T @ ((lam * r_prim - r_comp) / s))
            ds = -r_prim - a @ dx
            return dx, ds, (-r_comp - lam * ds) / s

        dx, ds, dl = direction(s * lam)  # predictor: the affine-scaling step
        step = jnp.minimum(1.0, jnp.minimum(max_step(s, ds), max_step(lam, dl)))
        sigma = (jnp.mean((s + step * ds) * (lam + step * dl)) / mu) ** 3
        dx, ds, dl = direction(s * lam + ds * dl - sigma * mu)  # corrector with centring
        step = jnp.minimum(1.0, 0.99 * jnp.minimum(max_step(s, ds), max_step(lam, dl)))
        new = (x + step * dx, s + step * ds, lam + step * dl)
        ok = jnp.all(jnp.isfinite(new[0])) & jnp.all(jnp.isfinite(new[1])) & jnp.all(jnp.isfinite(new[2]))
        return i + 1, tuple(jnp.where(ok, n, o) for n, o in zip(new, (x, s, lam))), ok

    start = (jnp.zeros((k,), hess.dtype), bound, jnp.ones((m,), hess.dtype))
    _, (x, _, _), _ = lax.while_loop(running, body, (jnp.int32(0), start, jnp.bool_(True)))
    return x


def _map_statistics(heat: jax.Array, floor: float) -> tuple[jax.Array, jax.Array]:
    """Per-map total squared weight f32[L] and weighted mean position f32[L, 2] of heat f32[H, W, L]."""
    h, w, _ = heat.shape
    w2 = jnp.square(jnp.where(heat > floor, heat, 0.0))
    cols, rows = w2.sum(0), w2.sum(1)  # [W, L], [H, L]
    total = cols.sum(0)
    mx = jnp.arange(w, dtype=heat.dtype) @ cols
    my = jnp.arange(h, dtype=heat.dtype) @ rows
    return total, jnp.stack([mx, my], -1) / jnp.maximum(total, 1e-30)[:, None]


def _rounded(points: jax.Array, h: int, w: int) -> tuple[jax.Array, jax.Array]:
    """Each point rounded to its pixel, i32[L] column and row (far-off or non-finite points kept off the map)."""
    p = jnp.nan_to_num(jnp.round(points), nan=-4.0 * (h + w), posinf=4.0 * (h + w), neginf=-4.0 * (h + w))
    p = jnp.clip(p, -4.0 * (h + w), 4.0 * (h + w)).astype(jnp.int32)
    return p[:, 0], p[:, 1]


def _patches(heat: jax.Array, y0: jax.Array, x0: jax.Array, ny: int, nx: int) -> jax.Array:
    """f32[L, ny, nx]: map l's pixels from row y0[l], column x0[l] (starts i32[L], inside the map)."""
    # One dynamic slice per map (5x faster on CPU than gathering every pixel by index), kept
    # map-major: the window sums then run along contiguous rows (4x faster than [ny, nx, L]).
    cut = lambda y, x, l: lax.dynamic_slice(heat, (y, x, l), (ny, nx, 1))[..., 0]  # noqa: E731
    return jax.vmap(cut)(y0, x0, jnp.arange(heat.shape[-1]))


def _window_statistics(heat: jax.Array, floor: float, points: jax.Array, half: int) -> tuple[jax.Array, jax.Array]:
    """``_map_statistics`` of the pixels within ``half`` (Chebyshev) of each map's rounded point.

    Only a (2 half + 1)^2 patch per map is read: it is gathered inside the map, moved
    inwards at the border, and masked back to the window.
    """
    h, w, num_l = heat.shape
    cx, cy = _rounded(points, h, w)
    ny, nx = min(2 * half + 1, h), min(2 * half + 1, w)
    y0, x0 = jnp.clip(cy - half, 0, h - ny), jnp.clip(cx - half, 0, w - nx)
    patch = _patches(heat, y0, x0, ny, nx)  # [L, ny, nx]
    ys, xs = y0[:, None] + jnp.arange(ny), x0[:, None] + jnp.arange(nx)  # [L, ny], [L, nx]
    inside = (jnp.abs(ys - cy[:, None]) <= half)[:, :, None] & (jnp.abs(xs - cx[:, None]) <= half)[:, None, :]
    w2 = jnp.square(jnp.where(inside & (patch > floor), patch, 0.0))
    rows, cols = w2.sum(2), w2.sum(1)  # [L, ny], [L, nx]
    total = rows.sum(1)
    mx, my = (cols * xs.astype(heat.dtype)).sum(1), (rows * ys.astype(heat.dtype)).sum(1)
    return total, jnp.stack([mx, my], -1) / jnp.maximum(total, 1e-30)[:, None]


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


def _fit(heat, theta, model: ShapeModel, num_components: int, cfg: PostprocessConfig, around=None, half: int = 0):
    """Constrained weighted least-squares fit of the rotated model: f32[L, 2].

    With ``around`` f32[L, 2], each map counts only within ``half`` pixels of its point.
    """
    h, w, num_l = heat.shape
    center = jnp.array([(w - 1) / 2.0, (h - 1) / 2.0], heat.dtype)
    comps = model.components[:num_components]
    if around is None:
        total, target = _map_statistics(heat, cfg.weight_floor)
    else:
        total, target = _window_statistics(heat, cfg.weight_floor, around, half)
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


def _nearest_peak_in_map(heat: jax.Array, points: jax.Array, fit_radius: int = 1) -> tuple[jax.Array, jax.Array]:
    """``_nearest_peak`` searched over the whole of every map."""
    h, w, _ = heat.shape
    xs, ys = jnp.arange(w, dtype=heat.dtype), jnp.arange(h, dtype=heat.dtype)
    d2 = (xs[None, :, None] - points[:, 0]) ** 2 + (ys[:, None, None] - points[:, 1]) ** 2
    d2 = jnp.where(_local_maxima(heat), d2, jnp.inf)
    xy, value = refine_at(heat, *first_argmax(-d2), radius=fit_radius)
    return xy, jnp.where(jnp.isfinite(jnp.min(d2, axis=(0, 1))), value, 0.0)


def _nearest_peak(heat: jax.Array, points: jax.Array, radius: int, fit_radius: int = 1) -> tuple[jax.Array, jax.Array]:
    """Nearest local maximum (3x3) of each map to its point, sub-pixel refined (``refine_at`` with ``fit_radius``):
    (f32[L, 2], value f32[L]).

    Searched first in a patch around the rounded point that covers every pixel within
    ``radius`` (Chebyshev) of it: any pixel outside lies more than radius + 1/2 from the
    point, so a peak found closer than that is the nearest of the whole map (ties resolve
    in row-major order either way).  Otherwise the whole map is searched.
    """
    h, w, num_l = heat.shape
    cx, cy = _rounded(points, h, w)
    ny, nx = min(2 * radius + 3, h), min(2 * radius + 3, w)
    y0, x0 = jnp.clip(cy - radius - 1, 0, h - ny), jnp.clip(cx - radius - 1, 0, w - nx)
    patch = _patches(heat, y0, x0, ny, nx)  # [L, ny, nx]
    is_peak = _local_maxima(patch, axes=(1, 2))
    ys, xs = y0[:, None] + jnp.arange(ny), x0[:, None] + jnp.arange(nx)  # [L, ny], [L, nx]
    # The patch's own edge padding is right only where the patch edge is the map's edge.
    ok_y = ((ys > y0[:, None]) | (ys == 0)) & ((ys < y0[:, None] + ny - 1) | (ys == h - 1))
    ok_x = ((xs > x0[:, None]) | (xs == 0)) & ((xs < x0[:, None] + nx - 1) | (xs == w - 1))
    fy, fx = ys.astype(heat.dtype), xs.astype(heat.dtype)
    d2 = (fx[:, None, :] - points[:, 0, None, None]) ** 2 + (fy[:, :, None] - points[:, 1, None, None]) ** 2
    d2 = jnp.where(is_peak & ok_y[:, :, None] & ok_x[:, None, :], d2, jnp.inf).reshape(num_l, ny * nx)
    idx = jnp.argmax(-d2, axis=-1)  # the first nearest in row-major order, as over the whole map
    proven = jnp.all(jnp.min(d2, axis=-1) < (radius + 0.5) ** 2)
    return lax.cond(proven, lambda: refine_at(heat, y0 + idx // nx, x0 + idx % nx, radius=fit_radius),
                    lambda: _nearest_peak_in_map(heat, points, fit_radius))


def _local_maxima(maps: jax.Array, axes: tuple[int, int] = (0, 1)) -> jax.Array:
    """bool: pixels >= their 3x3 neighbours (edge replicated) along ``axes`` and > at least one of them."""
    hi = lo = jnp.pad(maps, [(1, 1) if a in axes else (0, 0) for a in range(maps.ndim)], mode="edge")
    for a in axes:  # separable: over 3 along one axis, then the other
        n = maps.shape[a]
        hi = functools.reduce(jnp.maximum, [lax.slice_in_dim(hi, d, d + n, axis=a) for d in range(3)])
        lo = functools.reduce(jnp.minimum, [lax.slice_in_dim(lo, d, d + n, axis=a) for d in range(3)])
    return (maps >= hi) & (maps > lo)  # a flat neighbourhood is no peak


def _scaled(pixels: int, size: int) -> int:
    """A distance in pixels of a 96-pixel heatmap, in pixels of a ``size``-pixel one (at least 1)."""
    return max(1, round(pixels * size / 96))


def peak_fit_radius(cfg: PostprocessConfig, size: int) -> int:
    """``cfg.peak_fit_radius`` in pixels of ``size``-pixel heatmaps (1, the 3-point fit, stays 1)."""
    return _scaled(cfg.peak_fit_radius, size) if cfg.peak_fit_radius > 1 else 1


def decode_peaks(heatmaps: jax.Array, cfg: PostprocessConfig) -> tuple[jax.Array, jax.Array]:
    """The decoding without a shape model, over a whole batch: what ``postprocess_batch`` gives with
    ``use_shape_model=False``, as plain array operations (no loop over faces, no scatter), so that
    exporters (ONNX, LiteRT) carry it.

    Args:
      heatmaps: f32[B, H, W, L].
    Returns:
      landmarks f32[B, L, 2] (sub-pixel peaks, ``cfg.x_offset`` added to x) and their values f32[B, L].
    """
    landmarks, value = argmax_subpixel(heatmaps, peak_fit_radius(cfg, heatmaps.shape[1]))
    return landmarks + jnp.asarray([cfg.x_offset, 0.0], landmarks.dtype), value


def _postprocess_one(heat: jax.Array, model: ShapeModel, cfg: PostprocessConfig) -> tuple[jax.Array, jax.Array]:
    fit_radius = peak_fit_radius(cfg, heat.shape[0])
    init, peak = argmax_subpixel(heat[None], fit_radius)
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
            half = _scaled(half, size)
            fit = _fit(heat, theta, model, num_components, cfg, fit, half)
    if not cfg.blend:
        return fit, _values_at(heat, fit)
    peak_xy, value = _nearest_peak(heat, fit, _scaled(PEAK_SEARCH_RADIUS, heat.shape[0]), fit_radius)
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


def postprocess_batch(heatmaps: jax.Array, model: ShapeModel, config: PostprocessConfig) -> tuple[jax.Array, jax.Array]:
    """``_postprocess_one`` over a batch f32[B, H, W, L], for use inside a jitted function.

    The ``lax.cond``s of one face (closed-form fit, windowed peak search) run only the branch
    taken when the face is processed alone; ``vmap`` turns them into selects that run both.
    So a batch of one is not vmapped, and on the CPU a batch is a loop over faces (``lax.map``:
    3.4x faster per face than ``vmap`` at B=32 on 2 cores); accelerators get ``vmap``.
    """
    one = functools.partial(_postprocess_one, model=model, cfg=config)
    if heatmaps.shape[0] == 1:
        landmarks, value = jax.tree_util.tree_map(lambda v: v[None], one(heatmaps[0]))
    elif jax.default_backend() == "cpu":
        landmarks, value = lax.map(one, heatmaps)
    else:
        landmarks, value = jax.vmap(one)(heatmaps)
    if config.x_offset:
        landmarks = landmarks.at[..., 0].add(config.x_offset)
    return landmarks, value


@functools.partial(jax.jit, static_argnames="config")
def _postprocess(heatmaps, model, config):
    return postprocess_batch(heatmaps, model, config)


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
