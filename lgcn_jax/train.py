"""Training: pure ``train_step`` / ``eval_step`` and the ``train_and_evaluate`` loop."""

from __future__ import annotations

import functools
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from lgcn_jax import checkpoint as ckpt_lib
from lgcn_jax import input_pipeline, metrics, network
from lgcn_jax import shape_model as shape_model_lib
from lgcn_jax.config import Config, TrainConfig
from lgcn_jax.heatmaps import argmax_subpixel
from lgcn_jax.loss import heatmap_loss

__all__ = ["TrainState", "make_optimizer", "create_train_state", "loss", "train_step", "eval_step", "predict_split", "evaluate", "build_shape_model", "train_and_evaluate"]

log = logging.getLogger("lgcn_jax")


@struct.dataclass
class TrainState:
    step: jax.Array
    net: network.LGCNParams
    opt_state: Any
    tx: optax.GradientTransformation = struct.field(pytree_node=False)
    seed: int = struct.field(pytree_node=False, default=0)


def learning_rate_schedule(t: TrainConfig) -> optax.Schedule:
    boundaries = {int(s): float(f) for s, f in zip(t.lr_decay_steps, t.lr_decay_factors)}
    return optax.piecewise_constant_schedule(t.learning_rate, boundaries)


def make_optimizer(t: TrainConfig) -> optax.GradientTransformation:
    """Element-wise gradient clipping (the authors' truncation), then momentum SGD or Adam."""
    parts = []
    if t.grad_clip > 0:
        parts.append(optax.clip(t.grad_clip))
    if t.weight_decay > 0:
        parts.append(optax.add_decayed_weights(t.weight_decay))
    schedule = learning_rate_schedule(t)
    parts.append(optax.sgd(schedule, momentum=t.momentum) if t.optimizer == "momentum" else optax.adam(schedule))
    return optax.chain(*parts)


def create_train_state(config: Config, rng: jax.Array | None = None) -> TrainState:
    if rng is None:
        rng = jax.random.key(config.train.seed)
    net = network.init(rng, config, image_size=config.data.image_size)
    tx = make_optimizer(config.train)
    return TrainState(step=jnp.zeros((), jnp.int32), net=net, opt_state=tx.init(net.params), tx=tx, seed=config.train.seed)


def loss(params: Any, net: network.LGCNParams, batch: dict, rng: jax.Array, loss_scale: float) -> tuple[jax.Array, Any]:
    """Mean per-face loss of trainable ``params`` on a batch; returns (loss, new batch_stats)."""
    net = net.replace(params=params)
    o1, o2, batch_stats = network.apply_train(net, batch["image"], rng)
    per_face = heatmap_loss(o1, o2, batch["landmarks"], network.model_kernel(net.config), loss_scale, batch.get("mask"))
    return per_face.mean(), batch_stats


@functools.partial(jax.jit, static_argnames="loss_scale", donate_argnums=0)
def _train_step(state: TrainState, batch: dict, loss_scale: float) -> tuple[TrainState, dict]:
    # Dropout noise is a function of (seed, step): a resumed run draws the same masks.
    rng = jax.random.fold_in(jax.random.key(state.seed), state.step)
    grad_fn = jax.value_and_grad(loss, has_aux=True)
    (value, batch_stats), grads = grad_fn(state.net.params, state.net, batch, rng, loss_scale)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.net.params)
    params = optax.apply_updates(state.net.params, updates)
    new_state = state.replace(step=state.step + 1, net=state.net.replace(params=params, batch_stats=batch_stats), opt_state=opt_state)
    return new_state, {"loss": value, "grad_norm": optax.global_norm(grads)}


def train_step(state: TrainState, batch: dict, loss_scale: float = 0.05) -> tuple[TrainState, dict]:
    """One optimisation step (jit-compiled; ``state`` is donated).

    Args:
      batch: {"image": f32[B, H, W, 1], "landmarks": f32[B, L, 2]} (optional "mask": f32[B, L]).
    Returns:
      the new state and {"loss", "grad_norm"} scalars.
    """
    return _train_step(state, batch, loss_scale)


@jax.jit
def eval_step(net: network.LGCNParams, images: jax.Array) -> jax.Array:
    """Landmarks f32[B, L, 2] from images by the per-map sub-pixel maximum (no shape model)."""
    return argmax_subpixel(network.apply(net, images))[0]


def predict_split(net: network.LGCNParams, data: dict, batch_size: int = 32, max_batches: int = 0) -> np.ndarray:
    """Arg-max landmarks f32[N, L, 2] for the first ``max_batches`` batches (0: all) of a split held in memory."""
    from lgcn_jax.evaluation import predict_batches

    return predict_batches(lambda images: eval_step(net, images), data, batch_size, max_batches=max_batches)


def evaluate(net: network.LGCNParams, data: dict, batch_size: int = 32, max_batches: int = 0) -> dict:
    """NME (inter-ocular) of the arg-max decoder on a split held in memory."""
    pred = predict_split(net, data, batch_size, max_batches)
    errors = metrics.nme(pred, data["landmarks"][: len(pred)])
    auc, failure = metrics.auc_and_failure(errors)
    return {"nme": float(errors.mean()), "auc": auc, "failure_rate": failure, "num_faces": int(len(errors))}


def build_shape_model(config: Config, workdir: str, train_data: dict | None = None) -> str:
    """Learn the PCA shape model from the training split's landmarks and save it in ``workdir``; returns its path."""
    if train_data is None:
        train_data = input_pipeline.load_split(config.data, "train")
    n = len(train_data["landmarks"])
    k = min(config.postprocess.num_components, n - 1)
    if k < config.postprocess.num_components:
        log.warning("only %d training shapes: the shape model keeps %d components, not %d", n, k, config.postprocess.num_components)
    sm = shape_model_lib.build_shape_model(train_data["landmarks"], config.data.image_size, k)
    path = shape_model_lib.save_shape_model(workdir, sm)
    log.info("shape model from %d training shapes: %d components, %d order constraints -> %s",
             n, sm.num_components, int(sm.lower.shape[0]), path)
    return path


def _summary_writer(workdir: str):
    import tensorflow as tf

    return tf.summary.create_file_writer(os.path.join(workdir, "tb"))


def train_and_evaluate(config: Config, workdir: str, progress: bool = True) -> dict:
    """Train (or resume) in ``workdir``; returns the final validation metrics.

    Resuming: the run restores the latest checkpoint under ``workdir/last`` and
    continues from its step; the input stream, augmentation and dropout are
    functions of (seed, step), so the continued run follows the same path.
    """
    from tqdm.auto import tqdm

    stored = ckpt_lib.check_workdir_config(workdir, config)
    t = config.train
    train_data = input_pipeline.load_split(config.data, "train")
    val_data = input_pipeline.load_split(config.data, "validation" if config.data.dataset == "synthetic" else "common")
    state = create_train_state(config)
    ckpts = ckpt_lib.Checkpoints(workdir, keep=t.keep_checkpoints)
    start = ckpts.latest_step() or 0
    if start:
        state = ckpts.restore(start, state)
        log.info("resumed from %s/last/%d", workdir, start)
    elif stored is None:
        log.info("fresh run in %s", workdir)
    ckpt_lib.write_config(workdir, config)
    if not os.path.exists(os.path.join(workdir, shape_model_lib.FILENAME)):
        build_shape_model(config, workdir, train_data)
    writer = _summary_writer(workdir)
    result: dict = {}
    if start == 0:
        result = evaluate(state.net, val_data, max_batches=t.eval_batches)
        log.info("step 0 (untrained) validation NME %.4f", result["nme"])
        with writer.as_default():
            _scalars({"val/nme": result["nme"], "val/auc": result["auc"]}, 0)
    stream = input_pipeline.train_dataset(train_data, config.data, t.batch_size, t.seed, start_step=start)
    batches = input_pipeline.prefetch_to_device(stream.as_numpy_iterator())
    bar = tqdm(total=t.num_steps, initial=start, disable=not progress, unit="step", dynamic_ncols=True)
    step = start
    window_start, window_steps = time.perf_counter(), 0
    try:
        while step < t.num_steps:
            batch = next(batches)
            state, m = train_step(state, batch, t.loss_scale)
            step += 1
            window_steps += 1
            bar.update(1)
            if step % t.log_every == 0 or step == t.num_steps:
                loss_value = float(m["loss"])
                if not np.isfinite(loss_value):
                    raise FloatingPointError(f"loss became {loss_value} at step {step}; lower train.learning_rate or enable train.grad_clip")
                rate = window_steps * t.batch_size / (time.perf_counter() - window_start)
                window_start, window_steps = time.perf_counter(), 0
                bar.set_postfix(loss=f"{loss_value:.4f}", img_s=f"{rate:.1f}")
                with writer.as_default():
                    _scalars({"train/loss": loss_value, "train/grad_norm": float(m["grad_norm"]), "train/images_per_s": rate,
                              "train/lr": float(learning_rate_schedule(t)(step))}, step)
            if step % t.checkpoint_every == 0 or step == t.num_steps:
                ckpts.save(step, state)
            if step % t.eval_every == 0 or step == t.num_steps:
                result = evaluate(state.net, val_data, max_batches=t.eval_batches)
                ckpts.save_best(step, state, result["nme"])
                bar.write(f"step {step}: validation NME {result['nme']:.4f}  AUC@0.08 {result['auc']:.4f}  failures {result['failure_rate']:.3f}")
                with writer.as_default():
                    _scalars({"val/nme": result["nme"], "val/auc": result["auc"], "val/failure_rate": result["failure_rate"]}, step)
        if not result:
            result = evaluate(state.net, val_data, max_batches=t.eval_batches)
    finally:
        bar.close()
        writer.flush()
        ckpts.close()
    return result


def _scalars(values: dict, step: int) -> None:
    import tensorflow as tf

    for k, v in values.items():
        tf.summary.scalar(k, v, step=step)
