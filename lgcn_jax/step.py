"""One optimisation step, pure and jit-compiled: augmentation on the device, the loss, its gradient, the update."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from lgcn_jax import augment as augment_lib
from lgcn_jax import network
from lgcn_jax.config import DataConfig
from lgcn_jax.loss import heatmap_loss
from lgcn_jax.train_state import TrainState
from lgcn_jax.xla_options import jit

__all__ = ["loss", "train_step"]


def loss(params: Any, net: network.LGCNParams, batch: dict, rng: jax.Array, loss_scale: float, teacher_weight: float = 0.0) -> tuple[jax.Array, Any]:
    """Mean per-face loss of trainable ``params`` on a batch (with "teacher" maps: distillation); returns (loss, new batch_stats)."""
    net = net.replace(params=params)
    o1, o2, batch_stats = network.apply_train(net, batch["image"], rng)
    per_face = heatmap_loss(o1, o2, batch["landmarks"], network.model_kernel(net.config), loss_scale, batch.get("mask"),
                            batch.get("teacher"), teacher_weight)
    return per_face.mean(), batch_stats


@jit(static_argnames=("loss_scale", "augment", "skip_nonfinite", "teacher_weight"), donate_argnums=0)
def _train_step(state: TrainState, batch: dict, loss_scale: float, augment: DataConfig | None,
                skip_nonfinite: bool = False, teacher_weight: float = 0.0) -> tuple[TrainState, dict]:
    if augment is not None:  # raw u8 batches of the input pipeline, changed here on the device
        changed = augment_lib.augment_batch(batch["image"], batch["landmarks"], batch["example"], state.seed, augment, batch.get("teacher"))
        batch = {**{k: v for k, v in batch.items() if k != "example"}, **dict(zip(("image", "landmarks", "teacher"), changed))}
    # Dropout noise is a function of (seed, step): a resumed run draws the same masks.
    rng = jax.random.fold_in(jax.random.key(state.seed), state.step)
    grad_fn = jax.value_and_grad(loss, has_aux=True)
    (value, batch_stats), grads = grad_fn(state.net.params, state.net, batch, rng, loss_scale, teacher_weight)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.net.params)
    params = optax.apply_updates(state.net.params, updates)
    new_state = state.replace(step=state.step + 1, net=state.net.replace(params=params, batch_stats=batch_stats), opt_state=opt_state)
    grad_norm = optax.tree.norm(grads)
    if not skip_nonfinite:
        return new_state, {"loss": value, "grad_norm": grad_norm}
    ok = jnp.isfinite(value) & jnp.isfinite(grad_norm)
    # Keep everything but the step count: the batch is consumed, the parameters are not touched.
    kept = jax.tree_util.tree_map(lambda new, old: jnp.where(ok, new, old), new_state.replace(step=state.step), state)
    return kept.replace(step=state.step + 1), {"loss": value, "grad_norm": grad_norm, "skipped": (~ok).astype(jnp.int32)}


def train_step(state: TrainState, batch: dict, loss_scale: float = 0.05, augment: DataConfig | None = None,
               skip_nonfinite: bool = False, teacher_weight: float = 0.0) -> tuple[TrainState, dict]:
    """One optimisation step (jit-compiled; ``state`` is donated).

    Args:
      batch: {"image": f32[B, H, W, 1] in [0, 1] or u8, "landmarks": f32[B, L, 2]} (optional "mask": f32[B, L],
        and "teacher": f32|f16[B, H, W, L], another network's heatmaps of these crops); with ``augment``, a raw
        batch of ``input_pipeline`` that also holds "example": i32[B].
      augment: a DataConfig: augment the batch (and its teacher maps) on the device first (``lgcn_jax.augment``).
      skip_nonfinite: a batch with a non-finite loss or gradient leaves the state unchanged but
        for the step count, and the metrics get "skipped" (1 for such a batch).
      teacher_weight: the teacher maps' share of the target (``heatmap_loss``; ``train.distill_weight``).
    Returns:
      the new state and {"loss", "grad_norm"} scalars.
    """
    if augment is None and batch["image"].dtype == jnp.uint8:
        batch = {**batch, "image": network.check_images(batch["image"])}
    return _train_step(state, batch, loss_scale, augment, skip_nonfinite, teacher_weight)
