"""Training: pure ``train_step`` / ``eval_step`` and the ``train_and_evaluate`` loop."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import signal
import threading
import time
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lgcn_jax import augment as augment_lib
from lgcn_jax import checkpoint as ckpt_lib
from lgcn_jax import input_pipeline, metrics, network, sharding
from lgcn_jax import shape_model as shape_model_lib
from lgcn_jax.config import PRESETS, Config, DataConfig
from lgcn_jax.metric_writer import MetricWriter
from lgcn_jax.heatmaps import argmax_subpixel
from lgcn_jax.loss import heatmap_loss
from lgcn_jax.train_state import TrainState, create_train_state, learning_rate_schedule, make_optimizer

__all__ = ["TrainState", "make_optimizer", "create_train_state", "loss", "train_step", "eval_step", "predict_split", "evaluate", "write_shape_model", "training_splits", "recalibrated", "train_and_evaluate", "load_initial_weights", "export_workdir", "TrainingInterrupted"]

log = logging.getLogger("lgcn_jax")


def loss(params: Any, net: network.LGCNParams, batch: dict, rng: jax.Array, loss_scale: float) -> tuple[jax.Array, Any]:
    """Mean per-face loss of trainable ``params`` on a batch; returns (loss, new batch_stats)."""
    net = net.replace(params=params)
    o1, o2, batch_stats = network.apply_train(net, batch["image"], rng)
    per_face = heatmap_loss(o1, o2, batch["landmarks"], network.model_kernel(net.config), loss_scale, batch.get("mask"))
    return per_face.mean(), batch_stats


@functools.partial(jax.jit, static_argnames=("loss_scale", "augment", "skip_nonfinite"), donate_argnums=0)
def _train_step(state: TrainState, batch: dict, loss_scale: float, augment: DataConfig | None,
                skip_nonfinite: bool = False) -> tuple[TrainState, dict]:
    if augment is not None:  # the jax pipeline: raw u8 batches, changed here on the device
        image, landmarks = augment_lib.augment_batch(batch["image"], batch["landmarks"], batch["example"], state.seed, augment)
        batch = {**{k: v for k, v in batch.items() if k != "example"}, "image": image, "landmarks": landmarks}
    # Dropout noise is a function of (seed, step): a resumed run draws the same masks.
    rng = jax.random.fold_in(jax.random.key(state.seed), state.step)
    grad_fn = jax.value_and_grad(loss, has_aux=True)
    (value, batch_stats), grads = grad_fn(state.net.params, state.net, batch, rng, loss_scale)
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
               skip_nonfinite: bool = False) -> tuple[TrainState, dict]:
    """One optimisation step (jit-compiled; ``state`` is donated).

    Args:
      batch: {"image": f32[B, H, W, 1], "landmarks": f32[B, L, 2]} (optional "mask": f32[B, L]);
        with ``augment``, the raw batch of ``input_pipeline.array_batches``:
        {"image": u8[B, H, W, 1], "landmarks": f32[B, L, 2], "example": i32[B]}.
      augment: a DataConfig: augment the batch on the device first (``lgcn_jax.augment``).
      skip_nonfinite: a batch with a non-finite loss or gradient leaves the state unchanged but
        for the step count, and the metrics get "skipped" (1 for such a batch).
    Returns:
      the new state and {"loss", "grad_norm"} scalars.
    """
    return _train_step(state, batch, loss_scale, augment, skip_nonfinite)


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


def write_shape_model(config: Config, workdir: str, train_data: dict | None = None) -> str:
    """Learn the PCA shape model from the training split's landmarks and save it in ``workdir``; returns its path.

    (``lgcn_jax.build_shape_model`` builds one from landmarks in memory and writes nothing.)"""
    if train_data is None:
        train_data = training_splits(config)[0]
    n = len(train_data["landmarks"])
    if n < 2:
        raise input_pipeline.DatasetError(f"a shape model needs at least 2 training faces, the training split has {n}")
    k = min(config.postprocess.num_components, n - 1)
    if k < config.postprocess.num_components:
        log.warning("only %d training shapes: the shape model keeps %d components, not %d", n, k, config.postprocess.num_components)
    sm = shape_model_lib.build_shape_model(train_data["landmarks"], config.data.image_size, k)
    path = shape_model_lib.save_shape_model(workdir, sm)
    log.info("shape model from %d training shapes: %d components, %d order constraints -> %s",
             n, sm.num_components, int(sm.lower.shape[0]), path)
    return path


def build_shape_model(config: Config, workdir: str, train_data: dict | None = None) -> str:
    """Deprecated name of ``write_shape_model`` (it shared its name with ``lgcn_jax.build_shape_model``)."""
    warnings.warn("lgcn_jax.train.build_shape_model is now lgcn_jax.train.write_shape_model; the old name will be removed",
                  DeprecationWarning, stacklevel=2)
    return write_shape_model(config, workdir, train_data)


def training_splits(config: Config) -> tuple[dict, dict]:
    """(train, validation) in memory: synthetic's own validation split, or a holdout of 300-W train."""
    train_data = input_pipeline.load_split(config.data, "train")
    if config.data.dataset == "synthetic":
        return train_data, input_pipeline.load_split(config.data, "validation")
    if config.data.validation_faces == 0:
        log.warning("data.validation_faces=0: selecting the best checkpoint on the common subset, which is then no longer a clean test set")
        return train_data, input_pipeline.load_split(config.data, "common")
    train_data, val_data = input_pipeline.holdout(train_data, config.data.validation_faces)
    log.info("300-W train: %d faces for training, %d held out for validation", len(train_data["image"]), len(val_data["image"]))
    return train_data, val_data


class TrainingInterrupted(Exception):
    """SIGTERM or SIGINT stopped a run after a step and a checkpoint; rerunning resumes there."""

    def __init__(self, signum: int, step: int, checkpoint: str):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint {checkpoint} written, "
                         "rerun the same command to resume from it")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # 143 for SIGTERM, 130 for SIGINT, as shells report a signal


@contextlib.contextmanager
def _stop_on_signals():
    """Within: SIGTERM and SIGINT only set a flag (the list holds the signal), so the step finishes and a
    checkpoint is written; a second signal acts as it would have (the previous handler is back)."""
    stop: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield stop  # signal handlers can only be set from the main thread
        return
    previous = {}

    def handler(signum, frame):
        stop.append(signum)
        for sig, h in previous.items():
            signal.signal(sig, h)

    for sig in (signal.SIGTERM, signal.SIGINT):
        previous[sig] = signal.signal(sig, handler)
    try:
        yield stop
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)


def recalibrated(net: network.LGCNParams, train_data: dict, config: Config) -> network.LGCNParams:
    """``net`` with BatchNorm statistics over ``train.bn_recalibration_batches`` batches of training crops
    (a fixed random choice of faces, unaugmented: the inputs inference sees); unchanged when that is 0."""
    k, b = config.train.bn_recalibration_batches, config.train.batch_size
    if k == 0:
        return net
    n = len(train_data["image"])
    order = np.random.default_rng(config.train.seed).permutation(n)
    idx = np.resize(order, k * b).reshape(k, b)  # repeats faces only when the split has fewer than k * b
    return network.recalibrate_batch_stats(net, (train_data["image"][i] for i in idx))


# Dropout and the BatchNorm momentum act in training only: a fine-tuning run may set its own.
FINE_TUNE_FREE = frozenset({"dropout_rate", "bn_momentum"})


def load_initial_weights(config: Config) -> network.LGCNParams:
    """The weights ``config.train.init_from`` names (a checkpoint folder or released weights), checked to
    be of ``config``'s network; raises ``CheckpointError`` naming the folder and the differing fields."""
    from lgcn_jax.predict import checkpoint_path

    source = config.train.init_from
    path = checkpoint_path(source)
    net, stored = ckpt_lib.load_params(path)
    problems = ckpt_lib.network_differences(stored, config, also_free=FINE_TUNE_FREE)
    if problems:
        presets = [name for name, make in sorted(PRESETS.items())
                   if not ckpt_lib.network_differences(stored, make(), also_free=FINE_TUNE_FREE)]
        fix = f"run_train.py --preset {presets[0]}" if presets else "the network settings of its config.json"
        raise ckpt_lib.CheckpointError(
            f"train.init_from={source!r}: {path} holds a different network ({os.path.join(path, 'config.json')}):\n  "
            + "\n  ".join(problems)
            + f"\nFine-tune it with its own network ({fix}), or start from a checkpoint of this one.")
    return net


def _has_checkpoints(workdir: str) -> bool:
    last = os.path.join(workdir, "last")
    return os.path.isdir(last) and any(d.isdigit() for d in os.listdir(last))


def train_and_evaluate(config: Config, workdir: str, progress: bool = True) -> dict:
    """Train (or resume) in ``workdir``; returns the final validation metrics.

    Resuming: the run restores the latest checkpoint under ``workdir/last`` and
    continues from its step; the input stream, augmentation and dropout are
    functions of (seed, step), so the continued run follows the same path.
    Metrics go to ``workdir/metrics.jsonl`` and TensorBoard (``workdir/tb``).
    One run at a time: a second run on the same workdir is refused (``checkpoint.workdir_lock``).
    Fine-tuning: a run without a checkpoint yet starts from the weights of ``config.train.init_from``.
    """
    stored = ckpt_lib.check_workdir_config(workdir, config)
    # Loaded and checked before anything is written into the workdir.
    init = load_initial_weights(config) if config.train.init_from and not _has_checkpoints(workdir) else None
    # Process 0 holds the workdir; the other processes of a multi-host run share it by design.
    with ckpt_lib.workdir_lock(workdir) if jax.process_index() == 0 else contextlib.nullcontext():
        return _train_and_evaluate(config, workdir, progress, stored, init)


def _train_and_evaluate(config: Config, workdir: str, progress: bool, stored: Config | None,
                        init: network.LGCNParams | None = None) -> dict:
    from tqdm.auto import tqdm

    t = config.train
    mesh = sharding.data_mesh()
    rows = sharding.local_rows(t.batch_size, mesh)  # this process's rows of each global batch
    primary = jax.process_index() == 0  # one process writes the shared files; orbax coordinates checkpoints
    pipeline = input_pipeline.resolve_pipeline(config.data)
    train_data, val_data = training_splits(config)
    state = create_train_state(config)
    ckpt_lib.log_details_to(workdir)
    ckpts = ckpt_lib.Checkpoints(workdir, keep=t.keep_checkpoints)
    restored, start = ckpts.restore_latest(state)
    if restored is not None:
        state = restored
        log.info("resumed from %s/last/%d", workdir, start)
    else:
        if init is not None:  # fine-tuning: the weights of init_from, a fresh optimiser at step 0
            state = state.replace(net=state.net.replace(params=init.params, batch_stats=init.batch_stats),
                                  opt_state=state.tx.init(init.params))
        log.info("fresh run in %s (%s input pipeline, %d device(s))%s", workdir, pipeline, mesh.devices.size,
                 f", starting from the weights of {t.init_from}" if init is not None else "")
    state = sharding.replicate(state, mesh)
    writer = MetricWriter(workdir, start) if primary else MetricWriter.disabled()
    if primary:
        ckpt_lib.write_config(workdir, config)
        if not os.path.exists(os.path.join(workdir, shape_model_lib.FILENAME)):
            write_shape_model(config, workdir, train_data)
    result: dict = {}

    def validate(step: int) -> tuple[dict, network.LGCNParams]:
        net = recalibrated(state.net, train_data, config)
        res = evaluate(net, val_data, max_batches=t.eval_batches)
        writer.write(step, {"val/nme": res["nme"], "val/auc": res["auc"], "val/failure_rate": res["failure_rate"]})
        return res, net

    if start == 0:
        result, _ = validate(0)
        log.info("step 0 (%s) validation NME %.4f", f"the weights of {t.init_from}" if init is not None else "untrained", result["nme"])
    if pipeline == "tf":
        stream = input_pipeline.train_dataset(train_data, config.data, t.batch_size, t.seed, start_step=start).as_numpy_iterator()
        augment = None
    else:
        stream = input_pipeline.array_batches(train_data, t.batch_size, t.seed, start_step=start)
        augment = config.data
    batches = input_pipeline.prefetch_to_device(stream, put=lambda b: sharding.shard_batch({k: v[rows] for k, v in b.items()}, mesh))
    bar = tqdm(total=t.num_steps, initial=start, disable=not (progress and primary), unit="step", dynamic_ncols=True)
    step = start
    window_start, window_steps = time.perf_counter(), 0
    skipped = jnp.zeros((), jnp.int32)  # on the device: counting costs no synchronisation
    saved = start if restored is not None else None  # the newest checkpoint's step

    def check_finite(loss_value: float) -> None:
        if not np.isfinite(loss_value) and not t.skip_nonfinite:
            raise FloatingPointError(
                f"loss became {loss_value} at step {step}; "
                + (f"the newest checkpoint is {workdir}/last/{saved}" if saved is not None else "no checkpoint was written yet")
                + ". Lower "
                "train.learning_rate, enable train.grad_clip, or set train.skip_nonfinite=true to skip such batches")

    try:
        with _stop_on_signals() as stop:
            while step < t.num_steps:
                batch = next(batches)
                state, m = train_step(state, batch, t.loss_scale, augment, t.skip_nonfinite)
                step += 1
                window_steps += 1
                if t.skip_nonfinite:
                    skipped = skipped + m["skipped"]
                bar.update(1)
                if step % t.log_every == 0 or step == t.num_steps:
                    loss_value = float(m["loss"])
                    check_finite(loss_value)
                    rate = window_steps * t.batch_size / (time.perf_counter() - window_start)
                    window_start, window_steps = time.perf_counter(), 0
                    bar.set_postfix(loss=f"{loss_value:.4f}", img_s=f"{rate:.1f}")
                    values = {"train/loss": loss_value, "train/grad_norm": float(m["grad_norm"]), "train/images_per_s": rate,
                              "train/lr": float(learning_rate_schedule(t)(step))}
                    if t.skip_nonfinite:
                        values["train/skipped_batches"] = int(skipped)
                    writer.write(step, values)
                if step % t.checkpoint_every == 0 or step == t.num_steps or stop:
                    check_finite(float(m["loss"]))  # never a checkpoint of diverged parameters
                    ckpts.save(step, state)
                    saved = step
                if stop:
                    raise TrainingInterrupted(stop[0], step, os.path.join(workdir, "last", str(step)))
                if step % t.eval_every == 0 or step == t.num_steps:
                    result, net = validate(step)
                    ckpts.save_best(step, state.replace(net=net), result["nme"])
                    bar.write(f"step {step}: validation NME {result['nme']:.4f}  AUC@0.08 {result['auc']:.4f}  failures {result['failure_rate']:.3f}")
        if not result:
            result, _ = validate(step)
    finally:
        bar.close()
        writer.close()
        ckpts.close()
    return result


def export_workdir(workdir: str, directory: str, which: str = "best", recalibrate_batches: int = 0, data_dir: str | None = None,
                   calibrate_x_offset: bool = False) -> str:
    """Write a workdir's checkpoint as a self-contained folder (config.json, params.msgpack, shape_model.npz).

    With ``recalibrate_batches`` > 0 the BatchNorm statistics are measured again over that many
    batches of unaugmented training crops first (the best checkpoint already carries
    ``train.bn_recalibration_batches`` of them), read from ``data_dir`` (default: the workdir's stored one).
    With ``calibrate_x_offset`` the exported ``postprocess.x_offset`` is measured on the validation faces
    (``evaluation.horizontal_offset``; never on a test subset).
    Refuses to write into a non-empty ``directory``.
    """
    from lgcn_jax.predict import export_model, load_model

    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ckpt_lib.CheckpointError(f"{directory} is a file; export to a new folder")
    if os.path.isdir(directory) and os.listdir(directory):
        raise ckpt_lib.CheckpointError(f"{directory} exists and is not empty; nothing was written. Export to a new folder or remove it first")
    if recalibrate_batches < 0:
        raise ValueError(f"recalibrate_batches must be >= 0, got {recalibrate_batches}")
    model = load_model(workdir, which=which)
    config = model.config
    if data_dir:
        config = dataclasses.replace(config, data=dataclasses.replace(config.data, data_dir=data_dir))
    if calibrate_x_offset and config.data.dataset == "300w" and config.data.validation_faces == 0:
        raise ValueError("calibrate_x_offset needs faces held out of train (data.validation_faces > 0); "
                         "this run has none, and the test subsets are not used for calibration")
    if recalibrate_batches or calibrate_x_offset:
        train_data, val_data = training_splits(config)
        if recalibrate_batches:
            config = dataclasses.replace(config, train=dataclasses.replace(config.train, bn_recalibration_batches=recalibrate_batches))
            model = model._replace(params=recalibrated(model.params, train_data, config))
        if calibrate_x_offset:
            from lgcn_jax.evaluation import horizontal_offset

            offset = horizontal_offset(model, val_data)
            log.info("postprocess.x_offset = %.4f px, measured on %d validation faces", offset, len(val_data["image"]))
            model = model.with_postprocess(x_offset=round(offset, 4))
    return export_model(model, directory)
