"""Heatmap targets from landmark coordinates, and heatmap -> coordinate decoding.

Coordinates are (x, y) in pixels of the network input, 0-indexed, with the
centre of pixel [row i, col j] at (x=j, y=i).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lgcn_jax.decode_numpy import log_parabola_offset, quadratic_fit_matrix
from lgcn_jax.kernel_conv import Kernel

__all__ = ["tent_weights", "splat", "render_targets", "argmax_subpixel", "first_argmax", "refine_at"]


def tent_weights(coord: jax.Array, n: int) -> jax.Array:
    """Linear-interpolation weights of a 1D position onto n pixels.

    coord: f32[...]; returns f32[..., n] with at most two non-zeros summing to
    1 inside the image (less near the border, 0 outside).
    """
    grid = jnp.arange(n, dtype=jnp.float32)
    return jnp.maximum(0.0, 1.0 - jnp.abs(grid - coord[..., None]))


def splat(landmarks: jax.Array, height: int, width: int) -> jax.Array:
    """Bilinear one-hot maps: f32[B, L, 2] -> f32[B, H, W, L]."""
    wy = tent_weights(landmarks[..., 1], height)  # [B, L, H]
    wx = tent_weights(landmarks[..., 0], width)  # [B, L, W]
    return jnp.einsum("blh,blw->bhwl", wy, wx)


def render_targets(landmarks: jax.Array, height: int, width: int, kernel: Kernel) -> tuple[jax.Array, jax.Array]:
    """Training targets: the bilinear one-hot of each landmark blurred by the kernel.

    Equal to ``kernel_conv(splat(landmarks), kernel)`` but computed from the
    separable factors directly, so it costs O(R * L * (H + W) * H) not a blur.

    Args:
      landmarks: f32[B, L, 2] (x, y) pixel coordinates.
    Returns:
      targets f32[B, H, W, L], and inside f32[B, L]: the mass of each landmark's
      one-hot that falls inside the image (1 inside, 0 outside, fractional at the border).
    """
    wy = tent_weights(landmarks[..., 1], height)  # [B, L, H]
    wx = tent_weights(landmarks[..., 0], width)
    th = jnp.asarray(kernel.toeplitz(0, height))  # [R, H, H]
    tw = jnp.asarray(kernel.toeplitz(1, width))
    hp = jax.lax.Precision.HIGHEST
    by = jnp.einsum("rhp,blp->rblh", th, wy, precision=hp)
    bx = jnp.einsum("rwq,blq->rblw", tw, wx, precision=hp)
    targets = jnp.einsum("rblh,rblw->bhwl", by, bx, precision=hp)
    inside = wy.sum(-1) * wx.sum(-1)
    return targets, inside


def first_argmax(maps: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Row and column of each map's maximum, the first in row-major order (as ``argmax`` of the flat map).

    Args:
      maps: f32[..., H, W, L].
    Returns:
      iy, ix: i32[..., L].
    """
    # Two small arg-max reductions instead of one over H*W: XLA's CPU arg-max (a
    # variadic reduce) does not vectorise, and this is 6-10x faster there, with the same ties.
    iy = jnp.argmax(maps.max(-2), axis=-2)  # the first row holding the maximum
    row = jnp.take_along_axis(maps, iy[..., None, None, :], axis=-3)[..., 0, :, :]  # [..., W, L]
    return iy.astype(jnp.int32), jnp.argmax(row, axis=-2).astype(jnp.int32)


def _window_peak(flat: jax.Array, h: int, w: int, iy: jax.Array, ix: jax.Array, radius: int) -> tuple[jax.Array, jax.Array]:
    """Sub-pixel peak f32[..., L, 2] and a flag bool[..., L] (False: no concave maximum in the window) from a
    least-squares quadratic fitted to the log heatmap over a (2r+1)^2 window around (iy, ix) (moved inside the map)."""
    cy, cx = jnp.clip(iy, radius, h - 1 - radius), jnp.clip(ix, radius, w - 1 - radius)
    d = jnp.arange(-radius, radius + 1)
    rows = (cy[..., None, :] + jnp.repeat(d, 2 * radius + 1)[:, None])  # [..., n*n, L], row-major window
    cols = (cx[..., None, :] + jnp.tile(d, 2 * radius + 1)[:, None])
    values = jnp.take_along_axis(flat, rows * w + cols, axis=-2)  # [..., n*n, L]
    top = values.max(axis=-2, keepdims=True)
    # Relative to the window's maximum (the fit's x and y rows sum to 0, so only rounding changes): small sums.
    logs = jnp.log(jnp.maximum(values / jnp.where(top > 0, top, 1.0), 1e-6))
    coef = jnp.einsum("kn,...nl->...kl", jnp.asarray(quadratic_fit_matrix(radius), flat.dtype), logs,
                      precision=jax.lax.Precision.HIGHEST)
    _, b, c, dxx, dxy, dyy = (coef[..., k, :] for k in range(6))
    det = 4.0 * dxx * dyy - dxy * dxy
    safe = jnp.where(det > 0, det, 1.0)
    ox, oy = (dxy * c - 2.0 * dyy * b) / safe, (dxy * b - 2.0 * dxx * c) / safe
    ok = (dxx < 0) & (dyy < 0) & (det > 0) & (top[..., 0, :] > 0) & (jnp.abs(ox) <= radius) & (jnp.abs(oy) <= radius)
    return jnp.stack([cx + ox, cy + oy], axis=-1), ok


def refine_at(heatmaps: jax.Array, iy: jax.Array, ix: jax.Array, radius: int = 1) -> tuple[jax.Array, jax.Array]:
    """Sub-pixel peak position around integer pixels.

    ``radius`` 1: a parabola through the logs of each pixel and its two neighbours, along x and y.
    ``radius`` r > 1: a 2D quadratic fitted by least squares to the logs of the (2r+1)^2 window around
    the pixel (moved inwards at the border; r is capped so the window fits the map), where a maximum
    exists inside the window, else the 3-point fit.  Both are exact for a Gaussian peak; the window
    averages out the pixel-level noise of a network's maps (on 300-W, docs/architecture.md).

    Args:
      heatmaps: f32[..., H, W, L]; iy, ix: i32[..., L] pixel of each map's peak; radius: int >= 1.
    Returns:
      landmarks f32[..., L, 2] as (x, y), and the values at (iy, ix) f32[..., L].
    """
    h, w, l = heatmaps.shape[-3:]
    flat = heatmaps.reshape(heatmaps.shape[:-3] + (h * w, l))

    def at(y, x):
        return jnp.take_along_axis(flat, (jnp.clip(y, 0, h - 1) * w + jnp.clip(x, 0, w - 1))[..., None, :], axis=-2)[..., 0, :]

    peak = at(iy, ix)
    # At the border the missing neighbour mirrors the present one: offset 0 on that axis.
    left = jnp.where(ix > 0, at(iy, ix - 1), at(iy, ix + 1))
    right = jnp.where(ix < w - 1, at(iy, ix + 1), left)
    up = jnp.where(iy > 0, at(iy - 1, ix), at(iy + 1, ix))
    down = jnp.where(iy < h - 1, at(iy + 1, ix), up)
    x = ix + log_parabola_offset(left, peak, right, jnp)
    y = iy + log_parabola_offset(up, peak, down, jnp)
    xy = jnp.stack([x, y], axis=-1).astype(jnp.float32)
    radius = min(int(radius), (h - 1) // 2, (w - 1) // 2)
    if radius > 1:
        fitted, ok = _window_peak(flat, h, w, iy, ix, radius)
        xy = jnp.where(ok[..., None], fitted.astype(jnp.float32), xy)
    return xy, peak


def argmax_subpixel(heatmaps: jax.Array, radius: int = 1) -> tuple[jax.Array, jax.Array]:
    """Per-map maximum refined to sub-pixel accuracy (``refine_at``: a log-parabola along x and y, or with
    ``radius`` > 1 a log-quadratic fitted over a (2 radius + 1)^2 window).

    Args:
      heatmaps: f32[B, H, W, L]; radius: int >= 1, pixels of these maps.
    Returns:
      landmarks f32[B, L, 2] as (x, y), and peak values f32[B, L].
    """
    return refine_at(heatmaps, *first_argmax(heatmaps), radius=radius)
