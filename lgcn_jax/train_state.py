"""The training state and its optimiser: what a checkpoint holds, apart from the loop that trains it.

Its own module so that ``checkpoint`` (which restores a ``TrainState``) and ``train`` (which
writes checkpoints) need not import each other.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from lgcn_jax import network
from lgcn_jax.config import Config, TrainConfig
from lgcn_jax.lazy import lazy_import

__all__ = ["TrainState", "learning_rate_schedule", "make_optimizer", "create_train_state"]

optax = lazy_import("optax")  # loaded when an optimiser is first made


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
