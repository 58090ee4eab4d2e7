"""Training augmentation in jnp: similarity warp, mirror and photometric change, on the device.

The one implementation of the training augmentation: it runs inside the jit-compiled training
step, vmapped over the batch, whichever stream (tf.data or NumPy) gathered the batch.  Seven
uniform numbers ``u`` in [-1, 1) define one example's change (``sample_params``);
``augment_example`` applies them:

  u[0] rotation   angle = u0 * max_rotation_deg
  u[1] scale      1 + u1 * max_scale_delta
  u[2:4] shift    u * max_shift_frac * size pixels
  u[4] mirror     when u4 > 0 (and ``flip``), with the left/right point permutation
  u[5] contrast   lo + (u5 + 1) / 2 * (hi - lo), about the warped image's mean
  u[6] brightness u6 * brightness_delta, then clipped to [0, 1]

Example ``g`` of a run draws ``u`` from ``fold_in(key(seed) stream, g)``, so augmentation
is a function of (seed, g) and a resumed run repeats it exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lgcn_jax.config import DataConfig
from lgcn_jax.landmarks68 import FLIP_PERMUTATION, NUM_POINTS

__all__ = ["FLIP_PERMUTATION", "NUM_PARAMS", "sample_params", "augment_example", "augment_batch", "example_keys"]

NUM_PARAMS = 7
_STREAM = 0x41554721  # separates augmentation keys from the dropout keys fold_in(key(seed), step)


def example_keys(seed: int, examples: jax.Array) -> jax.Array:
    """One PRNG key per global example index ``examples`` i32[B]."""
    base = jax.random.fold_in(jax.random.key(seed), _STREAM)
    return jax.vmap(lambda g: jax.random.fold_in(base, g))(examples)


def sample_params(key: jax.Array) -> jax.Array:
    """f32[7] uniform in [-1, 1): the change applied to one example."""
    return jax.random.uniform(key, (NUM_PARAMS,), jnp.float32, -1.0, 1.0)


def augment_example(image: jax.Array, landmarks: jax.Array, u: jax.Array, config: DataConfig, maps: jax.Array | None = None):
    """Apply the change ``u`` f32[7] to one example.

    Args:
      image: f32[S, S, 1] in [0, 1].
      landmarks: f32[L, 2] (x, y) pixels; L must be 68 when ``config.flip``.
      maps: optional f32[S, S, L], one map per landmark (a teacher's heatmaps): moved with the pixels
        (zero outside the image) and, when mirrored, reordered with the points.
    Returns:
      the warped image f32[S, S, 1] (bilinear, edges reflected) and landmarks f32[L, 2]; and the maps
      f32[S, S, L] when given.
    """
    size = image.shape[0]
    s = float(size)
    c = (s - 1.0) / 2.0
    angle = u[0] * np.deg2rad(config.max_rotation_deg)
    scale = 1.0 + u[1] * config.max_scale_delta
    shift = u[2:4] * config.max_shift_frac * s
    flip = (u[4] > 0.0) & config.flip
    cos, sin = jnp.cos(angle) * scale, jnp.sin(angle) * scale
    # Points: optional mirror x -> S-1-x with the permutation, then p' = A (p - c) + c + shift.
    lm = jnp.where(flip, jnp.stack([s - 1.0 - landmarks[:, 0], landmarks[:, 1]], -1)[FLIP_PERMUTATION], landmarks)
    x, y = lm[:, 0] - c, lm[:, 1] - c
    out_lm = jnp.stack([cos * x - sin * y + c + shift[0], sin * x + cos * y + c + shift[1]], -1)
    # Pixels: each output pixel samples the input at A^-1 (p' - c - shift) + c, mirrored.
    det = cos * cos + sin * sin
    yy, xx = jnp.meshgrid(jnp.arange(size, dtype=jnp.float32), jnp.arange(size, dtype=jnp.float32), indexing="ij")
    dx, dy = xx - c - shift[0], yy - c - shift[1]
    src_x = (cos * dx + sin * dy) / det + c
    src_y = (-sin * dx + cos * dy) / det + c
    src_x = jnp.where(flip, s - 1.0 - src_x, src_x)
    warped = jax.scipy.ndimage.map_coordinates(image[..., 0], [src_y, src_x], order=1, mode="reflect")
    lo, hi = config.contrast_range
    contrast = lo + (u[5] + 1.0) / 2.0 * (hi - lo)
    mean = warped.mean()
    warped = (warped - mean) * contrast + mean + u[6] * config.brightness_delta
    out_image = jnp.clip(warped, 0.0, 1.0)[..., None]
    if maps is None:
        return out_image, out_lm
    moved = jax.vmap(lambda m: jax.scipy.ndimage.map_coordinates(m, [src_y, src_x], order=1, mode="constant"), in_axes=2, out_axes=2)(
        maps.astype(jnp.float32))
    return out_image, out_lm, jnp.where(flip, moved[..., FLIP_PERMUTATION], moved)


def augment_batch(images: jax.Array, landmarks: jax.Array, examples: jax.Array, seed: int, config: DataConfig,
                  maps: jax.Array | None = None):
    """Augment a batch on the device; jit- and vmap-friendly.

    Args:
      images: u8[B, S, S, 1] or f32[B, S, S, 1] in [0, 1].
      landmarks: f32[B, L, 2].
      examples: i32[B] global example indices (step * batch + i), the source of randomness.
      maps: optional f32[B, S, S, L] (or f16) per-landmark maps changed with the pixels (``augment_example``).
    Returns:
      images f32[B, S, S, 1] in [0, 1] and landmarks f32[B, L, 2]; and the maps f32[B, S, S, L] when given.
    """
    images = images.astype(jnp.float32) / 255.0 if images.dtype == jnp.uint8 else images.astype(jnp.float32)
    if not config.augment:
        return (images, landmarks) if maps is None else (images, landmarks, maps.astype(jnp.float32))
    if config.flip and landmarks.shape[-2] != NUM_POINTS:
        raise ValueError(f"mirroring needs the 68-point markup, got {landmarks.shape[-2]} points; set data.flip=false")
    u = jax.vmap(sample_params)(example_keys(seed, examples))
    if maps is None:
        return jax.vmap(lambda im, lm, p: augment_example(im, lm, p, config))(images, landmarks, u)
    return jax.vmap(lambda im, lm, p, m: augment_example(im, lm, p, config, m))(images, landmarks, u, maps)
