"""Images -> landmarks: the network and the post-processing in one jit, and loading a trained model."""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import NamedTuple, Union

import jax
import jax.numpy as jnp

from lgcn_jax import network, sharding
from lgcn_jax.config import EXECUTION_FIELDS, Config, PostprocessConfig, validate
from lgcn_jax.landmarks68 import NUM_POINTS, mirror_heatmaps
from lgcn_jax.postprocess import check_heatmaps, postprocess_batch
from lgcn_jax.shape_model import ShapeModel, ShapeModelError, empty_shape_model, load_shape_model, save_shape_model

__all__ = ["Model", "heatmaps", "predict", "predict_with_confidence", "load_model", "export_model", "load_pretrained", "PRETRAINED"]


class Model(NamedTuple):
    """Everything inference needs: network parameters, shape model (or None) and the run's config."""

    params: network.LGCNParams
    shape_model: ShapeModel | None
    config: Config

    def with_postprocess(self, **settings) -> "Model":
        """This model with other inference settings (fields of ``PostprocessConfig``), e.g.
        ``load_pretrained().with_postprocess(flip_test=True)``; the weights are shared, not copied."""
        fields = {f.name for f in dataclasses.fields(PostprocessConfig)}
        unknown = sorted(set(settings) - fields)
        if unknown:
            raise ValueError(f"unknown postprocess settings {unknown}; fields of PostprocessConfig: {', '.join(sorted(fields))}")
        config = dataclasses.replace(self.config, postprocess=dataclasses.replace(self.config.postprocess, **settings))
        validate(config)
        return self._replace(config=config)

    def with_execution(self, **settings) -> "Model":
        """This model run another way, same weights: fields of ``config.EXECUTION_FIELDS``, e.g.
        ``load_pretrained().with_execution(compute_dtype="bfloat16")`` (bf16 convolution blocks)."""
        unknown = sorted(set(settings) - EXECUTION_FIELDS)
        if unknown:
            raise ValueError(f"unknown execution settings {unknown}; they are: {', '.join(sorted(EXECUTION_FIELDS))}")
        config = dataclasses.replace(self.config, model=dataclasses.replace(self.config.model, **settings))
        validate(config)
        return self._replace(config=config, params=self.params.replace(config=config.model))


def heatmaps(params: network.LGCNParams, images: jax.Array, flip_test: bool = False) -> jax.Array:
    """The network's heatmaps f32[B, H, W, L] of images f32[B, H, W, 1] (or u8), as ``predict`` decodes them.

    With ``flip_test`` they are the mean of the image's maps and its mirror image's maps mirrored back
    (``landmarks68.mirror_heatmaps``); both halves run as one batch of 2B.
    """
    if not flip_test:
        return network.apply(params, images)
    b = images.shape[0]
    both = network.apply(params, jnp.concatenate([images, images[:, :, ::-1]]))
    return 0.5 * (both[:b] + mirror_heatmaps(both[b:]))


@functools.partial(jax.jit, static_argnames="config")
def _predict(params, images, shape_model, config):
    return postprocess_batch(heatmaps(params, images, config.flip_test), shape_model, config)


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
    if config.flip_test and params.config.num_landmarks != NUM_POINTS:
        raise ValueError(f"flip_test needs the 68-point markup (its left/right permutation); this network marks "
                         f"{params.config.num_landmarks} points: set postprocess.flip_test=false")
    images = network.check_images(images)
    size = images.shape[1]
    if shape_model is not None:
        check_heatmaps((1, size, images.shape[2], params.config.num_landmarks), shape_model)
    else:
        shape_model = empty_shape_model(params.config.num_landmarks, size)
    mesh = sharding.data_mesh(jax.local_devices())
    if mesh.devices.size > 1 and images.shape[0] >= mesh.devices.size:
        # Split the batch over the local devices; parameters and shape model go to each of them.
        images, n = sharding.shard_leading(images, mesh)
        params, shape_model = sharding.replicate((params, shape_model), mesh)
        landmarks, confidence = _predict(params, images, shape_model, config)
        return landmarks[:n], confidence[:n]
    return _predict(params, images, shape_model, config)


def predict(model: Union[Model, network.LGCNParams], images, shape_model: ShapeModel | None = None,
            config: PostprocessConfig | None = None) -> jax.Array:
    """Landmarks f32[B, L, 2] ((x, y) pixels of the input) for images f32[B, H, W, 1] in [0, 1] or u8.

    ``model`` is a ``Model`` from ``load_model`` (its shape model and post-processing
    settings are used) or bare ``LGCNParams`` with an optional ``shape_model``.
    Without a shape model the landmarks are the per-map arg-max, refined to sub-pixel as
    ``postprocess.peak_fit_radius`` says.
    Network and post-processing compile to one XLA program.
    """
    return predict_with_confidence(model, images, shape_model, config)[0]


def load_model(path: str, which: str = "best", require_shape_model: bool = True) -> Model:
    """Load a trained model from a run_train.py workdir (or an exported checkpoint folder).

    Raises CheckpointError / ShapeModelError naming the missing or corrupt file.
    """
    from lgcn_jax.checkpoint import CheckpointError, load_params

    if not os.path.exists(path) and os.path.isdir(pretrained_path(path)):
        raise CheckpointError(f"no folder {path!r} here; {path!r} is a released checkpoint: load_pretrained({path!r}) "
                              f"(--checkpoint {path} for run_eval.py and lgcn-detect)")
    params, config = load_params(path, which=which)
    if require_shape_model or os.path.exists(os.path.join(path, "shape_model.npz")):
        shape_model = load_shape_model(path)
    else:
        shape_model = None
    if shape_model is not None:
        if shape_model.image_size != config.data.image_size or shape_model.num_landmarks != params.config.num_landmarks:
            raise ShapeModelError(
                f"{path}/shape_model.npz was built for {shape_model.num_landmarks} landmarks on {shape_model.image_size} px crops, "
                f"but the network predicts {params.config.num_landmarks} on {config.data.image_size} px; rebuild it with "
                f"`python run_train.py --workdir {path} --shape_model_only`"
            )
    return Model(params, shape_model, config)


def export_model(model: Model, directory: str) -> str:
    """Write ``model`` as a self-contained checkpoint folder (config.json, params.msgpack, shape_model.npz)."""
    from lgcn_jax.checkpoint import export_params

    export_params(directory, model.params, model.config)
    if model.shape_model is not None:
        save_shape_model(directory, model.shape_model)
    return directory


PRETRAINED = "300w_paper"


def _checkpoints_dir() -> str:
    env = os.environ.get("LGCN_CHECKPOINTS")
    if env:
        return env
    here = os.path.dirname(os.path.abspath(__file__))
    installed = os.path.join(here, "checkpoints")  # a wheel install (pyproject.toml maps checkpoints/ there)
    return installed if os.path.isdir(installed) else os.path.join(os.path.dirname(here), "checkpoints")  # a checkout


def pretrained_path(name: str = PRETRAINED) -> str:
    """The folder of the released checkpoint ``name``."""
    return os.path.join(_checkpoints_dir(), name)


def _released_path(name: str, missing: str, fix: str) -> str:
    """``pretrained_path(name)``, or a ``CheckpointError`` saying ``missing``, listing the released names, and ``fix``."""
    path = pretrained_path(name)
    if not os.path.isdir(path):
        from lgcn_jax.checkpoint import CheckpointError

        root = _checkpoints_dir()
        have = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))) if os.path.isdir(root) else []
        raise CheckpointError(f"{missing} at {path}; available: {have}. Set LGCN_CHECKPOINTS to the folder holding it, or {fix}")
    return path


def checkpoint_path(checkpoint: str | None = None) -> str:
    """A ``--checkpoint`` argument as a folder: a folder (or anything path-like) as given, else the released
    weights of that name (``300w_cpu``), and the default weights (``PRETRAINED``) for None; an unknown name
    is a ``CheckpointError`` listing the released ones."""
    if not checkpoint:
        return _released_path(PRETRAINED, f"no released checkpoint {PRETRAINED!r}", "pass one")
    if os.path.isdir(checkpoint) or os.sep in checkpoint or (os.altsep and os.altsep in checkpoint):
        return checkpoint
    return _released_path(checkpoint, f"no checkpoint folder {checkpoint!r} here and no released checkpoint of that name", "give a path")


@functools.lru_cache(maxsize=4)
def load_pretrained(name: str = PRETRAINED) -> Model:
    """The released weights under ``checkpoints/NAME`` of the checkout, ``lgcn_jax/checkpoints/NAME`` in an
    installed wheel, or ``$LGCN_CHECKPOINTS/NAME`` where that is set.

    The default, ``300w_paper``, is the paper's network (128 filters, 96x96 crops) trained on
    1813 real 300-W training faces on one GPU: 3.26% inter-ocular NME on the 300-W common subset
    with the shape model.  ``300w_cpu`` is the small ``cpu`` preset (64x64 crops, 1/46 of the
    FLOPs, 3.90%) for when speed on a CPU matters more.  ``synthetic_quick`` is the quick preset
    trained on the synthetic faces of ``data_prep`` (for tests and the offline demo; not for real
    photos).
    checkpoints/README.md gives their training commands and numbers, and the 300-W licence
    (non-commercial research).  Other weights go in the same layout (``export_model``) and
    load by their name.
    """
    return load_model(_released_path(name, f"no released checkpoint {name!r}", "pass params= explicitly"))
