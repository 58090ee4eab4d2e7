"""The LGCN training loss (the authors' weighted squared error on blurred maps)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lgcn_jax.heatmaps import render_targets
from lgcn_jax.kernel_conv import Kernel

__all__ = ["heatmap_loss"]


def heatmap_loss(o1: jax.Array, o2: jax.Array, landmarks: jax.Array, kernel: Kernel, loss_scale: float = 0.05, mask: jax.Array | None = None,
                 teacher: jax.Array | None = None, teacher_weight: float = 0.0) -> jax.Array:
    """Per-face loss f32[B].

    Both the blurred local output ``o1`` and the final output ``o2`` are
    pulled towards the blurred one-hot target (with ``teacher``: towards
    ``(1 - teacher_weight) * target + teacher_weight * teacher``, distillation).  Each landmark's squared error
    is weighted by ``0.1 + inside + 0.5 * mean(inside)``, where ``inside`` is
    1 for a landmark in the image and 0 outside, so points that left the crop
    still pull (weakly) towards an empty map.

    Args:
      o1, o2: f32[B, H, W, L] network outputs.
      landmarks: f32[B, L, 2] (x, y) pixel coordinates.
      mask: optional f32[B, L], 0 for unlabelled points (excluded entirely).
      teacher: optional f32[B, H, W, L], another network's heatmaps of the same crops.
    """
    _, h, w, _ = o2.shape
    target, inside = render_targets(landmarks, h, w, kernel)
    if teacher is not None:
        target = (1.0 - teacher_weight) * target + teacher_weight * teacher.astype(target.dtype)
    if mask is not None:
        inside = inside * mask
    weights = 0.1 + inside + 0.5 * inside.mean(-1, keepdims=True)
    if mask is not None:
        weights = weights * mask
    err = jnp.sum((o1 - target) ** 2 + (o2 - target) ** 2, axis=(1, 2))  # [B, L]
    return loss_scale * jnp.sum(err * weights, axis=-1)
