"""The training loop: ``train_and_evaluate`` trains (or resumes) a run in a workdir.

Also what a run makes and takes: its shape model, fine-tuning from other weights, BatchNorm
recalibration, and the export of a run's best checkpoint as a model folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from lgcn_jax import checkpoint as ckpt_lib
from lgcn_jax import datasets, input_pipeline, network, sharding
from lgcn_jax.predict import heatmaps as network_heatmaps
from lgcn_jax import shape_model as shape_model_lib
from lgcn_jax.config import PRESETS, Config, write_config
from lgcn_jax.errors import CheckpointError, DatasetError
from lgcn_jax.evaluation import evaluate, horizontal_offset
from lgcn_jax.evaluation import tune_decoding as tune_decoding_on
from lgcn_jax.logs import log, log_details_to, quiet_failed_restores
from lgcn_jax.metric_writer import MetricWriter
from lgcn_jax.files import atomic_path
from lgcn_jax.release import checkpoint_path, export_model, load_model, load_params, resolve_model
from lgcn_jax.step import train_step
from lgcn_jax.train_state import create_train_state, learning_rate_schedule
from lgcn_jax.workdir import check_workdir_config, network_differences, workdir_lock
from lgcn_jax.xla_options import jit

__all__ = ["train_and_evaluate", "write_shape_model", "training_splits", "recalibrated", "load_initial_weights", "export_workdir",
           "TrainingInterrupted", "FINE_TUNE_FREE", "teacher_maps"]


def write_shape_model(config: Config, workdir: str, train_data: dict | None = None) -> str:
    """Learn the PCA shape model from the training split's landmarks and save it in ``workdir``; returns its path.

    (``lgcn_jax.build_shape_model`` builds one from landmarks in memory and writes nothing.)"""
    if train_data is None:
        train_data = training_splits(config)[0]
    n = len(train_data["landmarks"])
    if n < 2:
        raise DatasetError(f"a shape model needs at least 2 training faces, the training split has {n}")
    k = min(config.postprocess.num_components, n - 1)
    if k < config.postprocess.num_components:
        log.warning("only %d training shapes: the shape model keeps %d components, not %d", n, k, config.postprocess.num_components)
    sm = shape_model_lib.build_shape_model(train_data["landmarks"], config.data.image_size, k)
    path = shape_model_lib.save_shape_model(workdir, sm)
    log.info("shape model from %d training shapes: %d components, %d order constraints -> %s",
             n, sm.num_components, int(sm.lower.shape[0]), path)
    return path


def training_splits(config: Config) -> tuple[dict, dict]:
    """(train, validation) in memory: synthetic's own validation split, or a holdout of 300-W train."""
    train_data = datasets.load_split(config.data, "train")
    if config.data.dataset == "synthetic":
        return train_data, datasets.load_split(config.data, "validation")
    if config.data.validation_faces == 0:
        log.warning("data.validation_faces=0: selecting the best checkpoint on the common subset, which is then no longer a clean test set")
        return train_data, datasets.load_split(config.data, "common")
    train_data, val_data = datasets.holdout(train_data, config.data.validation_faces)
    log.info("300-W train: %d faces for training, %d held out for validation", len(train_data["image"]), len(val_data["image"]))
    return train_data, val_data


TEACHER_FILE = "teacher_maps.npz"


def teacher_maps(config: Config, train_data: dict, workdir: str | None = None, batch_size: int = 8) -> np.ndarray:
    """The heatmaps of ``config.train.distill_from`` for every face of ``train_data``: f16[N, S, S, L] at the
    student's crop size S, each computed on the teacher's own crop of the face (the split loaded at the
    teacher's size) and resized (antialiased bilinear, as splits are).  Kept in ``WORKDIR/teacher_maps.npz``
    and read from there when it was made by the same teacher for the same faces."""
    teacher = resolve_model(config.train.distill_from, "train.distill_from")
    size, n = config.data.image_size, len(train_data["image"])
    if teacher.data.dataset != config.data.dataset or teacher.params.config.num_landmarks != config.model.num_landmarks:
        raise CheckpointError(f"train.distill_from={config.train.distill_from!r} marks {teacher.params.config.num_landmarks} landmarks "
                              f"on {teacher.data.dataset} crops; this run marks {config.model.num_landmarks} on {config.data.dataset}: "
                              "a teacher must see the same crops and mark the same points")
    names = train_data.get("file_name")
    key = {"teacher": teacher.name, "size": size, "faces": n, "file_names": [] if names is None else [str(f) for f in names]}
    path = os.path.join(workdir, TEACHER_FILE) if workdir else None
    if path and os.path.exists(path):
        with np.load(path, allow_pickle=False) as z:
            if json.loads(str(z["key"])) == key:
                return z["maps"]
        log.warning("%s was made for another teacher or other faces; computing it again", path)
    full = datasets.load_split(dataclasses.replace(config.data, image_size=teacher.data.image_size), "train")
    if names is None:  # no file names (synthetic faces): the split itself, row for row
        rows = np.arange(n)
    else:
        where = {str(f): i for i, f in enumerate(full["file_name"])}
        rows = np.array([where[str(f)] for f in names])
    maps = np.empty((n, size, size, config.model.num_landmarks), np.float16)

    @jit
    def run(images):
        h = network_heatmaps(teacher.params, images)
        return jax.image.resize(h, (h.shape[0], size, size, h.shape[-1]), "linear", antialias=True)

    log.info("teacher maps of %s for %d training faces", teacher.name, n)
    for lo in tqdm(range(0, n, batch_size), desc="teacher maps", unit="batch", disable=jax.process_index() != 0):
        idx = rows[lo:lo + batch_size]
        images = sharding.pad_rows(full["image"][idx].astype(np.float32) / 255.0, batch_size)
        maps[lo:lo + len(idx)] = np.asarray(run(images))[: len(idx)]
    if path and jax.process_index() == 0:
        with atomic_path(path, ".npz") as tmp:
            np.savez(tmp, maps=maps, key=json.dumps(key))
    return maps


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
    source = config.train.init_from
    path = checkpoint_path(source)
    net, stored = load_params(path)
    problems = network_differences(stored, config, also_free=FINE_TUNE_FREE)
    if problems:
        presets = [name for name, make in sorted(PRESETS.items())
                   if not network_differences(stored, make(), also_free=FINE_TUNE_FREE)]
        fix = f"run_train.py --preset {presets[0]}" if presets else "the network settings of its config.json"
        raise CheckpointError(
            f"train.init_from={source!r}: {path} holds a different network ({os.path.join(path, 'config.json')}):\n  "
            + "\n  ".join(problems)
            + f"\nFine-tune it with its own network ({fix}), or start from a checkpoint of this one.")
    return net


def _has_step_checkpoints(workdir: str) -> bool:
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
    stored = check_workdir_config(workdir, config)
    # Loaded and checked before anything is written into the workdir.
    init = load_initial_weights(config) if config.train.init_from and not _has_step_checkpoints(workdir) else None
    # Process 0 holds the workdir; the other processes of a multi-host run share it by design.
    with workdir_lock(workdir) if jax.process_index() == 0 else contextlib.nullcontext():
        return _train_and_evaluate(config, workdir, progress, stored, init)


def _train_and_evaluate(config: Config, workdir: str, progress: bool, stored: Config | None,
                        init: network.LGCNParams | None = None) -> dict:
    t = config.train
    mesh = sharding.data_mesh()
    rows = sharding.local_rows(t.batch_size, mesh)  # this process's rows of each global batch
    primary = jax.process_index() == 0  # one process writes the shared files; orbax coordinates checkpoints
    pipeline = input_pipeline.resolve_pipeline(config.data)
    train_data, val_data = training_splits(config)
    state = create_train_state(config)
    log_details_to(workdir)  # the run's own log file: tracebacks of failed saves and restores
    quiet_failed_restores()
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
        write_config(workdir, config)
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
    if t.distill_from:
        train_data = {**train_data, "teacher": teacher_maps(config, train_data, workdir)}
    stream = input_pipeline.train_batches(train_data, config.data, t.batch_size, t.seed, start_step=start)
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
                state, m = train_step(state, batch, t.loss_scale, config.data, t.skip_nonfinite, t.distill_weight if t.distill_from else 0.0)
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
                   calibrate_x_offset: bool = False, tune_decoding: bool = False) -> str:
    """Write a workdir's checkpoint as a self-contained folder (config.json, params.msgpack, shape_model.npz).

    With ``recalibrate_batches`` > 0 the BatchNorm statistics are measured again over that many
    batches of unaugmented training crops first (the best checkpoint already carries
    ``train.bn_recalibration_batches`` of them), read from ``data_dir`` (default: the workdir's stored one).
    With ``calibrate_x_offset`` the exported ``postprocess.x_offset`` is measured on the validation faces
    (``evaluation.horizontal_offset``; never on a test subset); with ``tune_decoding`` so is
    ``postprocess.peak_fit_radius`` and then ``local_windows``, each candidate with its own offset (``evaluation.tune_decoding``).
    Refuses to write into a non-empty ``directory``.
    """
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise CheckpointError(f"{directory} is a file; export to a new folder")
    if os.path.isdir(directory) and os.listdir(directory):
        raise CheckpointError(f"{directory} exists and is not empty; nothing was written. Export to a new folder or remove it first")
    if recalibrate_batches < 0:
        raise ValueError(f"recalibrate_batches must be >= 0, got {recalibrate_batches}")
    model = load_model(workdir, which=which)
    config = model.config
    if data_dir:
        config = dataclasses.replace(config, data=dataclasses.replace(config.data, data_dir=data_dir))
    if (calibrate_x_offset or tune_decoding) and config.data.dataset == "300w" and config.data.validation_faces == 0:
        raise ValueError("calibrate_x_offset (and tune_decoding) needs faces held out of train (data.validation_faces > 0); "
                         "this run has none, and the test subsets are not used for calibration")
    if recalibrate_batches or calibrate_x_offset or tune_decoding:
        train_data, val_data = training_splits(config)
        if recalibrate_batches:
            config = dataclasses.replace(config, train=dataclasses.replace(config.train, bn_recalibration_batches=recalibrate_batches))
            model = model.replace(params=recalibrated(model.params, train_data, config))
        if tune_decoding:
            model, table = tune_decoding_on(model, val_data)
            for (r, windows), (offset, nme) in table.items():
                log.info("peak_fit_radius %2d, local_windows %-8s: x_offset %.4f px, validation NME %.4f%%", r, list(windows), offset, 100 * nme)
            log.info("chose peak_fit_radius=%d, local_windows=%s, x_offset=%.4f on %d validation faces", model.postprocess.peak_fit_radius,
                     list(model.postprocess.local_windows), model.postprocess.x_offset, len(val_data["image"]))
        elif calibrate_x_offset:
            offset = horizontal_offset(model, val_data)
            log.info("postprocess.x_offset = %.4f px, measured on %d validation faces", offset, len(val_data["image"]))
            model = model.with_postprocess(x_offset=round(offset, 4))
    return export_model(model, directory)
