"""A training workdir: one run at a time, and only the network it was started with.

Layout::

    config.json        the full Config of the run (lgcn_jax.config.write_config)
    last/, best/       orbax checkpoints (lgcn_jax.checkpoint)
    shape_model.npz    the PCA shape model, learned from the training split
    metrics.jsonl, tb/ every logged number (lgcn_jax.metric_writer)
    lgcn.log           full tracebacks of failed saves and restores (lgcn_jax.logs)
    .lock              held by the run that trains here
"""

from __future__ import annotations

import contextlib
import os
import socket

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; workdirs are not guarded there
    fcntl = None

from lgcn_jax.config import CONFIG_FILE, Config, config_to_dict, read_config
from lgcn_jax.errors import CheckpointError
from lgcn_jax.logs import log
from lgcn_jax.release import PARAMS_FILE

__all__ = ["LOCK_FILE", "network_differences", "workdir_lock", "check_workdir_config"]

LOCK_FILE = ".lock"


def network_differences(stored: Config, requested: Config, also_free: frozenset = frozenset()) -> list[str]:
    """The network fields (``model.*``) in which ``requested`` differs from ``stored``, one line each; the
    fields named in ``also_free`` may differ.  How the network runs (``execution.*``) is not its identity."""
    a, b = config_to_dict(stored)["model"], config_to_dict(requested)["model"]
    return [f"model.{k}: stored {a[k]!r}, requested {b.get(k)!r}" for k in a if k not in also_free and a[k] != b.get(k)]


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

    Returns the stored config (or None for a fresh workdir).  Training and execution
    settings may change between runs (e.g. more steps); the network and image size
    may not, since the checkpoint could not be restored into it.
    """
    _not_a_file(workdir)
    if os.path.exists(os.path.join(workdir, PARAMS_FILE)):
        raise CheckpointError(f"{workdir} holds {PARAMS_FILE}: it is an exported model folder, not a training workdir, and "
                              f"training there would not update it; train into a new --workdir")
    path = os.path.join(workdir, CONFIG_FILE)
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
