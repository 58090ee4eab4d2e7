"""Training and evaluation streams over a split held in memory (``lgcn_jax.datasets``).

Example ``g`` of the endless training stream is a pure function of (seed, g): face ``perm_e[g % N]``
of epoch ``e = g // N``, so resuming at step s is exact (the stream starts at g = s * batch).  Batches
are raw: {"image": u8[B, S, S, 1], "landmarks": f32[B, L, 2], "example": i32[B]}, and the training step
augments them on the device (``lgcn_jax.augment``, keyed by the example index).  Two streams make
them, chosen by ``data.pipeline``:

* ``tf``: tf.data (the ``data`` extra) permutes each epoch with a stateless index shuffle, gathers,
  batches and prefetches on its own threads (``tf_batches``);
* ``jax``: NumPy permutes each epoch and gathers in this thread (``array_batches``); no TensorFlow.

``auto`` takes tf.data where TensorFlow is installed.  Both yield the same kind of batch; the
permutations differ, the distribution of what the step sees does not.
"""

from __future__ import annotations

import collections
from typing import Iterator

import jax
import numpy as np

from lgcn_jax.config import DataConfig
from lgcn_jax.datasets import DATA_EXTRA, has_tensorflow
from lgcn_jax.errors import DatasetError
from lgcn_jax.sharding import pad_rows

__all__ = ["resolve_pipeline", "train_batches", "tf_batches", "array_batches", "eval_batches", "prefetch_to_device"]

MAX_EXAMPLES = 2**31  # example indices are i32 on the device


def resolve_pipeline(config: DataConfig) -> str:
    """"tf" or "jax": the training stream ``config.pipeline`` asks for ("auto": tf.data where TensorFlow is installed)."""
    if config.pipeline == "auto":
        return "tf" if has_tensorflow() else "jax"
    if config.pipeline == "tf" and not has_tensorflow():
        raise DatasetError(f"data.pipeline=tf needs tensorflow and tensorflow-datasets ({DATA_EXTRA}), or use data.pipeline=jax (or auto)")
    return config.pipeline


def _check(data: dict[str, np.ndarray]) -> int:
    n = len(data["image"])
    if n == 0:
        raise DatasetError("the training split is empty")
    return n


def array_batches(data: dict[str, np.ndarray], batch_size: int, seed: int, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Endless raw batches from step ``start_step``, gathered with NumPy (a permutation seeded by (seed, epoch)).

    A split's "teacher" maps (distillation: f16[N, S, S, L]) travel with their examples."""
    images, landmarks = data["image"], data["landmarks"].astype(np.float32)
    teacher = data.get("teacher")
    n = _check(data)
    g = start_step * batch_size
    epoch, perm = -1, None
    while True:
        ids = np.arange(g, g + batch_size, dtype=np.int64)
        idx = np.empty(batch_size, np.int64)
        for e in np.unique(ids // n):
            if e != epoch:
                epoch, perm = int(e), np.random.default_rng([seed, int(e)]).permutation(n)
            sel = ids // n == e
            idx[sel] = perm[ids[sel] % n]
        if ids[-1] >= MAX_EXAMPLES:
            raise DatasetError("the training stream passed 2**31 examples; start a new run")
        batch = {"image": images[idx], "landmarks": landmarks[idx], "example": ids.astype(np.int32)}
        if teacher is not None:
            batch["teacher"] = teacher[idx]
        yield batch
        g += batch_size


def tf_batches(data: dict[str, np.ndarray], batch_size: int, seed: int, start_step: int = 0,
               parallel_calls: int = -1) -> Iterator[dict[str, np.ndarray]]:
    """Endless raw batches from step ``start_step``, gathered and prefetched by tf.data (a stateless index
    shuffle seeded by (seed, epoch)) on ``parallel_calls`` threads (-1: tf.data's autotuning); needs the
    ``data`` extra."""
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")  # tf.data only; the accelerator is JAX's
    n = _check(data)
    images = tf.constant(data["image"])
    landmarks = tf.constant(data["landmarks"].astype(np.float32))

    def make(g):
        j = tf.random.experimental.index_shuffle(g % n, seed=tf.stack([tf.constant(seed, tf.int64), g // n]), max_index=n - 1)
        return {"image": images[j], "landmarks": landmarks[j], "example": tf.cast(g, tf.int32)}

    ds = tf.data.Dataset.range(start_step * batch_size, MAX_EXAMPLES)
    ds = ds.map(make, num_parallel_calls=parallel_calls, deterministic=True)
    ds = ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.deterministic = True
    return ds.with_options(options).as_numpy_iterator()


def train_batches(data: dict[str, np.ndarray], config: DataConfig, batch_size: int, seed: int, start_step: int = 0):
    """The training stream ``config.pipeline`` chooses (``resolve_pipeline``); a split with teacher maps streams
    through NumPy (a gigabyte of maps is not worth copying into a TensorFlow graph)."""
    if resolve_pipeline(config) == "tf" and "teacher" not in data:
        return tf_batches(data, batch_size, seed, start_step, config.num_parallel_calls)
    return array_batches(data, batch_size, seed, start_step)


def eval_batches(data: dict[str, np.ndarray], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """The whole split in order, last batch padded; "valid" f32[B] marks real examples."""
    n = len(data["image"])
    for lo in range(0, n, batch_size):
        hi = min(n, lo + batch_size)
        yield {"image": pad_rows(data["image"][lo:hi].astype(np.float32) / 255.0, batch_size),
               "landmarks": pad_rows(data["landmarks"][lo:hi], batch_size),
               "valid": (np.arange(batch_size) < hi - lo).astype(np.float32)}


def prefetch_to_device(iterator, size: int = 2, put=None):
    """Keep ``size`` batches on the device ahead of the consumer, so the step never waits on a copy.

    ``put`` places one batch (default ``jax.device_put`` of each array; training passes
    ``sharding.shard_batch`` to split it over the devices).
    """
    put = put or (lambda batch: jax.tree_util.tree_map(jax.device_put, batch))
    queue = collections.deque()

    def enqueue(n):
        for _ in range(n):
            try:
                batch = next(iterator)
            except StopIteration:
                return
            queue.append(put(batch))

    enqueue(size)
    while queue:
        yield queue.popleft()
        enqueue(1)
