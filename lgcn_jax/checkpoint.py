"""Checkpoints with orbax: the last N, the best by validation NME, and the config beside them.

Layout of a workdir::

    config.json        the full Config the run was started with
    last/<step>/       orbax checkpoints, keep the last N
    best/<step>/       the single best by validation NME
    tb/                TensorBoard summaries

Orbax writes each checkpoint to a temporary folder and renames it when
complete, so a run killed mid-save leaves no half checkpoint behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import socket
import sys
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; workdirs are not guarded there
    fcntl = None

import jax
import orbax.checkpoint as ocp

from lgcn_jax import network
from lgcn_jax.config import EXECUTION_FIELDS, Config, config_from_dict, config_to_dict
from lgcn_jax.train_state import create_train_state

__all__ = ["CheckpointError", "check_workdir_config", "workdir_lock", "write_config", "read_config", "Checkpoints", "load_params", "export_params"]


class CheckpointError(RuntimeError):
    """A checkpoint or workdir cannot be used; the message names the file and the fix."""


log = logging.getLogger("lgcn_jax")
_DETAILS = logging.getLogger("lgcn_jax.details")  # full tracebacks: to a workdir's log file, not the terminal
_DETAILS.propagate = False
LOG_FILE = "lgcn.log"


def short_reason(e: BaseException | None) -> str:
    """One line of an exception (TensorStore's errors run over many lines)."""
    if e is None:
        return "unknown error"
    text = str(e).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(e).__name__}: {first[:300]}"


def log_details_to(workdir: str) -> str:
    """Send full error details (tracebacks of failed restores and saves) to ``WORKDIR/lgcn.log``; returns its path."""
    path = os.path.abspath(os.path.join(workdir, LOG_FILE))
    if not any(getattr(h, "baseFilename", None) == path for h in _DETAILS.handlers):
        os.makedirs(workdir, exist_ok=True)
        handler = logging.FileHandler(path)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        _DETAILS.addHandler(handler)
        _DETAILS.setLevel(logging.DEBUG)
    if not getattr(sys.unraisablehook, "_lgcn_quiet", False):
        sys.unraisablehook = _quiet_unraisablehook(sys.unraisablehook)
    asyncio_log = logging.getLogger("asyncio")
    if not any(isinstance(f, _OrbaxTaskFilter) for f in asyncio_log.filters):
        asyncio_log.addFilter(_OrbaxTaskFilter())
    return path


def _from_failed_restore(text: str) -> bool:
    return "orbax" in text or "tensorstore" in text.lower() or "_read_array_index" in text


class _OrbaxTaskFilter(logging.Filter):
    """After a failed restore, orbax's other array reads fail too, and asyncio reports each as "Task exception
    was never retrieved" with a traceback (once per array, many screens).  The restore's own error says
    what happened: these go to the workdir's log file only."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith("Task exception was never retrieved") and _from_failed_restore(message):
            _DETAILS.debug("%s", message, exc_info=record.exc_info)
            return False
        return True


def _quiet_unraisablehook(original):
    def hook(unraisable):
        # After a failed restore, TensorStore completes its reads on a thread and calls back into the
        # asyncio loop orbax has already closed; each callback reports this error as unraisable. It
        # tells the user nothing: keep it in the log file, let every other report through.
        value = unraisable.exc_value
        if (isinstance(value, RuntimeError) and str(value) == "Event loop is closed") or _from_failed_restore(repr(unraisable.object)):
            _DETAILS.debug("late TensorStore callback after a failed checkpoint operation",
                           exc_info=(unraisable.exc_type, value, unraisable.exc_traceback))
            return
        original(unraisable)

    hook._lgcn_quiet = True
    return hook


def detail_log_path() -> str | None:
    paths = [h.baseFilename for h in _DETAILS.handlers if hasattr(h, "baseFilename")]
    return paths[-1] if paths else None


def read_config(workdir: str) -> Config:
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise CheckpointError(f"{path} does not exist: {workdir} is not an lgcn_jax workdir or checkpoint folder (train one with run_train.py --workdir {workdir})")
    try:
        with open(path) as f:
            return config_from_dict(json.load(f))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path} is corrupt or from an incompatible lgcn_jax version ({e}); move it away or use another --workdir") from e


def _diff(a: Any, b: Any, prefix: str) -> list[str]:
    da, db = config_to_dict(a) if isinstance(a, Config) else a, config_to_dict(b) if isinstance(b, Config) else b
    return [f"{prefix}{k}: stored {da[k]!r}, requested {db[k]!r}" for k in da if da[k] != db.get(k)]


def network_differences(stored: Config, requested: Config, also_free: frozenset = frozenset()) -> list[str]:
    """The network fields in which ``requested`` differs from ``stored``, one line each (the fields of
    how it runs, ``EXECUTION_FIELDS``, and ``also_free`` may differ)."""
    free = EXECUTION_FIELDS | also_free
    model = {k: v for k, v in config_to_dict(stored)["model"].items() if k not in free}
    return _diff(model, config_to_dict(requested)["model"], "model.")


LOCK_FILE = ".lock"


def _not_a_file(workdir: str) -> None:
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise CheckpointError(f"--workdir {workdir} is a file, not a folder; name a new folder")


@contextlib.contextmanager
def workdir_lock(workdir: str):
    """Hold ``workdir`` for one training run: a second run started on it (the same command twice, two jobs)
    would interleave checkpoints and logs, so it gets a CheckpointError naming the holder.  An advisory
    lock on ``WORKDIR/.lock``; the system releases it when the process ends, however it ends."""
    _not_a_file(workdir)
    os.makedirs(workdir, exist_ok=True)
    f = open(os.path.join(workdir, LOCK_FILE), "a+")
    try:
        if fcntl is not None:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "another process"
                raise CheckpointError(f"{workdir} is in use by another training run ({holder}); wait for it to end, "
                                      "stop it, or use another --workdir") from None
            except OSError as e:  # a file system without locks (some network mounts): run unguarded
                log.debug("cannot lock %s (%s); running without the guard", workdir, e)
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        yield
    finally:
        f.close()  # closing releases the lock


def check_workdir_config(workdir: str, config: Config) -> Config | None:
    """Refuse to resume a workdir whose network differs from ``config``.

    Returns the stored config (or None for a fresh workdir).  Training
    settings may change between runs (e.g. more steps); the network and
    image size may not, since the checkpoint could not be restored into it.
    """
    _not_a_file(workdir)
    if os.path.exists(os.path.join(workdir, PARAMS_FILE)):
        raise CheckpointError(f"{workdir} holds {PARAMS_FILE}: it is an exported model folder, not a training workdir, and "
                              f"training there would not update it; train into a new --workdir")
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        if os.path.isdir(os.path.join(workdir, "last")) and os.listdir(os.path.join(workdir, "last")):
            raise CheckpointError(f"{workdir}/last holds checkpoints but {path} is missing; restore config.json or use a fresh --workdir")
        return None
    stored = read_config(workdir)
    problems = network_differences(stored, config)
    for field in ("image_size", "dataset"):
        if getattr(stored.data, field) != getattr(config.data, field):
            problems.append(f"data.{field}: stored {getattr(stored.data, field)!r}, requested {getattr(config.data, field)!r}")
    if problems:
        raise CheckpointError(
            f"{workdir} holds a checkpoint of a different network or dataset ({path}):\n  "
            + "\n  ".join(problems)
            + "\nNothing was changed. Use a new --workdir, or rerun with the settings stored there."
        )
    return stored


def write_config(workdir: str, config: Config) -> None:
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "config.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(config_to_dict(config), f, indent=2, sort_keys=True)
    os.replace(tmp, path)  # atomic: never a half-written config


class Checkpoints:
    """Two orbax managers: ``last`` (keep N) and ``best`` (keep 1, lowest val NME)."""

    def __init__(self, workdir: str, keep: int = 3):
        workdir = os.path.abspath(workdir)
        self.last = ocp.CheckpointManager(
            os.path.join(workdir, "last"),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False),
        )
        self.best = ocp.CheckpointManager(
            os.path.join(workdir, "best"),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=1, create=True, best_fn=lambda m: m["val_nme"], best_mode="min", enable_async_checkpointing=False
            ),
        )

    def latest_step(self) -> int | None:
        return self.last.latest_step()

    def save(self, step: int, state: Any) -> None:
        self._save(self.last, step, state)

    def save_best(self, step: int, state: Any, val_nme: float) -> None:
        self._save(self.best, step, state, metrics={"val_nme": float(val_nme)})

    def _save(self, manager, step: int, state: Any, **kw) -> None:
        # Orbax writes into a temporary folder and renames it when complete (its commit); older steps
        # are deleted only after that, so a failed write leaves every earlier checkpoint as it was.
        try:
            manager.save(step, args=ocp.args.StandardSave(state), **kw)
        except Exception as e:
            where = str(manager.directory)
            _DETAILS.debug("saving step %d to %s failed", step, where, exc_info=True)
            raise CheckpointError(
                f"could not write the checkpoint of step {step} to {where} ({short_reason(e)}); is the disk of "
                f"{os.path.dirname(where)} full or read-only? The earlier checkpoints there are intact: free space and "
                "rerun the same command to resume from the newest"
            ) from e

    def restore(self, step: int, target: Any, which: str = "last") -> Any:
        manager = self.last if which == "last" else self.best
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
        try:
            return manager.restore(step, args=ocp.args.StandardRestore(abstract))
        except Exception as e:  # orbax raises many types for bad files
            path = os.path.join(str(manager.directory), str(step))
            _DETAILS.debug("restoring %s failed", path, exc_info=True)
            raise CheckpointError(
                f"cannot restore the checkpoint {path}: {short_reason(e)}\n"
                "It is corrupt or was written by a different network; delete that step folder to fall back to an earlier one, or use a fresh --workdir."
            ) from e

    def restore_latest(self, target: Any) -> tuple[Any, int]:
        """Restore the newest ``last/`` checkpoint that restores; returns (state, step), or (None, 0) if there is none.

        Newer ones that fail are moved aside to ``last/corrupt-STEP`` (never deleted), with one
        warning each, once an older one has restored.  If none restores, nothing is moved and a
        CheckpointError names the folder and the way out.
        """
        failed = []
        for step in sorted(self.last.all_steps(), reverse=True):
            try:
                state = self.restore(step, target)
            except CheckpointError as e:
                failed.append((step, e))
                continue
            for bad, err in failed:
                moved = self._move_aside(bad)
                log.warning("checkpoint %s/%d does not restore (%s); moved it to %s, resuming from step %d",
                            self.last.directory, bad, short_reason(err.__cause__), moved, step)
            if failed:
                self.last.reload()
            return state, step
        if failed:
            where = str(self.last.directory)
            raise CheckpointError(
                f"none of the {len(failed)} checkpoints in {where} restores (newest: step {failed[0][0]}: {short_reason(failed[0][1].__cause__)}); "
                f"details in {detail_log_path() or 'the log'}. Nothing was moved. Move {where} aside to start this workdir from step 0, "
                "or use a fresh --workdir"
            )
        return None, 0

    def _move_aside(self, step: int) -> str:
        src = os.path.join(str(self.last.directory), str(step))
        dst = os.path.join(str(self.last.directory), f"corrupt-{step}")
        k = 1
        while os.path.exists(dst):
            dst = os.path.join(str(self.last.directory), f"corrupt-{step}.{k}")
            k += 1
        os.rename(src, dst)
        return dst

    def best_step(self) -> int | None:
        return self.best.best_step() if self.best.all_steps() else None

    def close(self) -> None:
        self.last.close()
        self.best.close()


PARAMS_FILE = "params.msgpack"


def export_params(directory: str, params, config: Config) -> None:
    """Write a compact, orbax-free checkpoint: config.json and params.msgpack (flax serialization)."""
    from flax import serialization

    os.makedirs(directory, exist_ok=True)
    # The data folder is machine-specific; a released checkpoint should not point into someone's disk.
    write_config(directory, dataclasses.replace(config, data=dataclasses.replace(config.data, data_dir="")))
    path = os.path.join(directory, PARAMS_FILE)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(serialization.msgpack_serialize(jax.device_get({"params": params.params, "batch_stats": params.batch_stats})))
    os.replace(tmp, path)


def _load_exported(path: str, config: Config):
    from flax import serialization

    # Shapes only: running init (a compiled forward pass) would cost seconds for the paper network.
    template = jax.eval_shape(lambda key: network.init(key, config, image_size=config.data.image_size), jax.random.key(0))
    file = os.path.join(path, PARAMS_FILE)
    try:
        with open(file, "rb") as f:
            state = serialization.msgpack_restore(f.read())
        restored = serialization.from_state_dict({"params": template.params, "batch_stats": template.batch_stats}, state)
        shapes = jax.tree_util.tree_map(lambda a, b: a.shape == b.shape, restored, {"params": template.params, "batch_stats": template.batch_stats})
        if not all(jax.tree_util.tree_leaves(shapes)):
            raise ValueError("array shapes differ from the network in config.json")
    except Exception as e:  # msgpack, key and shape errors alike
        raise CheckpointError(f"cannot load {file}: {type(e).__name__}: {e}\nIt is corrupt or does not match {path}/config.json; re-export it.") from e
    return template.replace(params=restored["params"], batch_stats=restored["batch_stats"])


def load_params(path: str, which: str = "best"):
    """Load network parameters from a workdir (its best checkpoint, or last, or the latest if no best)
    or from an exported folder (config.json + params.msgpack).

    Returns (LGCNParams, Config).
    """
    if which not in ("best", "last"):
        raise ValueError(f"which must be 'best' or 'last', got {which!r}")
    if os.path.exists(path) and not os.path.isdir(path):
        raise CheckpointError(f"{path} is a file; a model is a folder: a run_train.py workdir or an exported checkpoint")
    config = read_config(path)
    if os.path.exists(os.path.join(path, PARAMS_FILE)):
        return _load_exported(path, config), config
    if not any(os.path.isdir(os.path.join(path, d)) for d in ("last", "best")):
        # Checked before anything is created in the user's folder.
        raise CheckpointError(f"{path} holds config.json but neither {PARAMS_FILE} (an exported model) nor last/ or best/ "
                              f"(a run_train.py workdir): copy the missing {PARAMS_FILE} back, or train first with "
                              f"`python run_train.py --workdir {path}`")
    # The restore target needs shapes, dtypes and placement only (creating the state would compile and run
    # a forward pass: seconds for the paper network).
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    state = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
                                   jax.eval_shape(lambda: create_train_state(config)))
    log_details_to(path)
    ckpts = Checkpoints(path)
    try:
        step = ckpts.best_step() if which == "best" else None
        if step is None:
            step, which = ckpts.latest_step(), "last"
        if step is None:
            raise CheckpointError(f"{path} has no checkpoint yet (no step folder under last/ or best/); train first")
        try:
            state = ckpts.restore(step, state, which=which)
        except CheckpointError as e:
            folder = os.path.join(os.path.abspath(path), which, str(step))
            other = ("load the newest instead: run_eval.py --which last (load_model(path, which='last'))" if which == "best"
                     else f"move {folder} aside to fall back to the step before it")
            raise CheckpointError(f"the {which} checkpoint {folder} does not restore ({short_reason(e.__cause__)}); {other}") from e.__cause__
    finally:
        ckpts.close()
    return state.net, config
