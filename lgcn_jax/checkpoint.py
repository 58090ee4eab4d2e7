"""Orbax checkpoints of a training run: the last N steps and the best by validation NME.

Layout inside a workdir (``lgcn_jax.workdir`` has the rest of it)::

    last/<step>/       orbax checkpoints, keep the last N
    best/<step>/       the single best by validation NME

Orbax writes each checkpoint to a temporary folder and renames it when
complete, so a run killed mid-save leaves no half checkpoint behind.
"""

from __future__ import annotations

import os
from typing import Any

import jax

from lgcn_jax import network
from lgcn_jax.config import Config
from lgcn_jax.errors import CheckpointError
from lgcn_jax.lazy import lazy_import
from lgcn_jax.logs import detail_log_path, details, log, short_reason
from lgcn_jax.train_state import create_train_state

__all__ = ["Checkpoints", "restore_params", "has_checkpoints"]

ocp = lazy_import("orbax.checkpoint")  # loaded when a workdir is first opened


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
            details.debug("saving step %d to %s failed", step, where, exc_info=True)
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
            details.debug("restoring %s failed", path, exc_info=True)
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


def has_checkpoints(workdir: str) -> bool:
    """Whether ``workdir`` holds orbax checkpoints (``last/`` or ``best/`` folders)."""
    return any(os.path.isdir(os.path.join(workdir, d)) for d in ("last", "best"))


def restore_params(path: str, config: Config, which: str = "best") -> network.LGCNParams:
    """The network of a workdir's ``which`` checkpoint ("best", or "last"; the newest when there is no best).

    Raises ``CheckpointError`` naming the step folder and the way out when it does not restore.
    """
    if which not in ("best", "last"):
        raise ValueError(f"which must be 'best' or 'last', got {which!r}")
    # The restore target needs shapes, dtypes and placement only (creating the state would compile and run
    # a forward pass: seconds for the paper network).
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    state = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
                                   jax.eval_shape(lambda: create_train_state(config)))
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
    return state.net
