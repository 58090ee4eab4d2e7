"""Data parallelism with JAX's own sharding: one mesh axis over every device of every process.

The training step stays the same pure, jit-compiled function: its inputs carry shardings
(parameters and optimizer state replicated, the batch split along its first axis) and XLA
partitions the computation, inserting the all-reduces itself.  So the loss mean and the
BatchNorm statistics are those of the *global* batch, exactly as on one device.

Several processes (hosts): call ``jax.distributed.initialize()`` first (``run_train.py
--distributed``); every process then feeds only its own rows of each global batch
(``shard_batch`` builds the global array with ``jax.make_array_from_process_local_data``).
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = ["data_mesh", "batch_sharding", "replicated", "replicate", "local_rows", "check_batch_size", "shard_batch", "shard_leading", "pad_rows", "initialize_distributed"]

AXIS = "data"


def initialize_distributed(environ=None) -> dict:
    """``jax.distributed.initialize`` for one process of a multi-host run; returns the arguments it was given.

    On SLURM, Open MPI or a Cloud TPU slice JAX finds the coordinator, process count and id
    itself.  Elsewhere set ``JAX_COORDINATOR_ADDRESS=host0:1234`` (read by JAX), and
    ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` (read here: JAX has no variables for them).
    """
    environ = os.environ if environ is None else environ
    kwargs = {}
    for var, arg in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
        if environ.get(var, "").strip():
            try:
                kwargs[arg] = int(environ[var])
            except ValueError:
                raise ValueError(f"{var}={environ[var]!r} is not a whole number") from None
    jax.distributed.initialize(**kwargs)
    return kwargs


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1D mesh named "data" over ``devices`` (default: every device of every process)."""
    return Mesh(np.asarray(jax.devices() if devices is None else devices), (AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Every array leaf of ``tree`` as a copy on each device of ``mesh``."""
    return jax.device_put(tree, replicated(mesh))


def check_batch_size(global_batch: int, mesh: Mesh) -> int:
    """The per-device batch; a clear error when the global batch does not divide over the devices."""
    n = mesh.devices.size
    if global_batch % n:
        raise ValueError(f"train.batch_size={global_batch} does not divide over the {n} devices of this run; "
                         f"use a multiple of {n} (e.g. {((global_batch + n - 1) // n) * n})")
    return global_batch // n


def local_rows(global_batch: int, mesh: Mesh) -> slice:
    """The rows of a global batch that this process feeds (its devices' shards, in mesh order)."""
    per_device = check_batch_size(global_batch, mesh)
    mine = [i for i, d in enumerate(mesh.devices.flat) if d.process_index == jax.process_index()]
    if mine != list(range(mine[0], mine[-1] + 1)):
        raise ValueError("this process's devices are not contiguous in the mesh; build it from jax.devices() order")
    return slice(mine[0] * per_device, (mine[-1] + 1) * per_device)


def shard_batch(local: dict, mesh: Mesh) -> dict:
    """Process-local rows (``local_rows`` of the global batch) -> global arrays split along the batch axis."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}


def pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
    """``x`` with its first axis padded to ``rows`` by repeating its last row (compiled shapes stay few;
    the padding's results are dropped by the caller)."""
    x = np.asarray(x)
    pad = rows - x.shape[0]
    if pad < 0:
        raise ValueError(f"cannot pad {x.shape[0]} rows to {rows}")
    return np.concatenate([x, np.repeat(x[-1:], pad, 0)]) if pad else x


def shard_leading(x: jax.Array | np.ndarray, mesh: Mesh | None = None) -> tuple[jax.Array, int]:
    """Split an inference batch over the local devices: pad its first axis to a multiple of the device
    count (repeating the last row) and shard it.  Returns (array, number of real rows)."""
    mesh = data_mesh(jax.local_devices()) if mesh is None else mesh
    n, b = mesh.devices.size, x.shape[0]
    if n == 1:
        return x, b
    if b % n:
        x = pad_rows(x, b + (-b) % n)
    return jax.device_put(x, batch_sharding(mesh)), b
