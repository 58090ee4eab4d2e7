"""Images -> landmarks: the network and the post-processing in one jit, and loading a trained model."""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import NamedTuple, Union

import jax
import jax.numpy as jnp

from lgcn_jax import network
from lgcn_jax.config import Config, PostprocessConfig
from lgcn_jax.postprocess import _postprocess_one, check_heatmaps
from lgcn_jax.shape_model import ShapeModel, load_shape_model

__all__ = ["Model", "predict", "predict_with_confidence", "load_model"]


class Model(NamedTuple):
    """Everything inference needs: network parameters, shape model (or None) and the run's config."""

    params: network.LGCNParams
    shape_model: ShapeModel | None
    config: Config


@functools.partial(jax.jit, static_argnames="config")
def _predict(params, images, shape_model, config):
    heatmaps = network.apply(params, images)
    return jax.vmap(lambda hm: _postprocess_one(hm, shape_model, config))(heatmaps)


def predict_with_confidence(model: Union[Model, network.LGCNParams], images, shape_model: ShapeModel | None = None,
                            config: PostprocessConfig | None = None) -> tuple[jax.Array, jax.Array]:
    """``predict`` that also returns a per-point confidence f32[B, L] (the heatmap value at the chosen peak, ~1 when sure)."""
    if isinstance(model, Model):
        params = model.params
        shape_model = model.shape_model if shape_model is None else shape_model
        config = model.config.postprocess if config is None else config
    else:
        params = model
    config = PostprocessConfig() if config is None else config
    if shape_model is None:
        config = dataclasses.replace(config, use_shape_model=False)
    images = network.check_images(images)
    size = images.shape[1]
    if shape_model is not None:
        check_heatmaps((1, size, images.shape[2], params.config.num_landmarks), shape_model)
        return _predict(params, images, shape_model, config)
    dummy = ShapeModel(jnp.zeros((params.config.num_landmarks, 2)), jnp.zeros((1, params.config.num_landmarks, 2)),
                       jnp.zeros((0,), jnp.int32), jnp.zeros((0,), jnp.int32), size)
    return _predict(params, images, dummy, config)


def predict(model: Union[Model, network.LGCNParams], images, shape_model: ShapeModel | None = None,
            config: PostprocessConfig | None = None) -> jax.Array:
    """Landmarks f32[B, L, 2] ((x, y) pixels of the input) for images f32[B, H, W, 1] in [0, 1] or u8.

    ``model`` is a ``Model`` from ``load_model`` (its shape model and post-processing
    settings are used) or bare ``LGCNParams`` with an optional ``shape_model``.
    Without a shape model the landmarks are the per-map sub-pixel arg-max.
    Network and post-processing compile to one XLA program.
    """
    return predict_with_confidence(model, images, shape_model, config)[0]


def load_model(path: str, which: str = "best", require_shape_model: bool = True) -> Model:
    """Load a trained model from a run_train.py workdir (or an exported checkpoint folder).

    Raises CheckpointError / ShapeModelError naming the missing or corrupt file.
    """
    from lgcn_jax.checkpoint import load_params

    params, config = load_params(path, which=which)
    if require_shape_model or os.path.exists(os.path.join(path, "shape_model.npz")):
        shape_model = load_shape_model(path)
    else:
        shape_model = None
    if shape_model is not None:
        if shape_model.image_size != config.data.image_size or shape_model.num_landmarks != params.config.num_landmarks:
            from lgcn_jax.shape_model import ShapeModelError

            raise ShapeModelError(
                f"{path}/shape_model.npz was built for {shape_model.num_landmarks} landmarks on {shape_model.image_size} px crops, "
                f"but the network predicts {params.config.num_landmarks} on {config.data.image_size} px; rebuild it with "
                f"`python run_train.py --workdir {path} --shape_model_only`"
            )
    return Model(params, shape_model, config)
