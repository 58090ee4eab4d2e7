"""Images -> landmarks: the network and the post-processing in one jit, and the ``Model`` they run."""

from __future__ import annotations

import dataclasses
from typing import Union

import jax
import jax.numpy as jnp

from lgcn_jax import executables, network, sharding
from lgcn_jax.config import EXECUTION_FIELDS, Config, DataConfig, ExecutionConfig, PostprocessConfig, TrainConfig, validate
from lgcn_jax.landmarks68 import NUM_POINTS, mirror_heatmaps
from lgcn_jax.postprocess import check_heatmaps, postprocess_batch
from lgcn_jax.shape_model import ShapeModel, empty_shape_model
from lgcn_jax.xla_options import jit

__all__ = ["Model", "heatmaps", "predict", "predict_with_confidence"]


@dataclasses.dataclass(frozen=True)
class Model:
    """Everything inference needs.

    ``params`` holds the arrays, the network's config and how it runs (``params.config``,
    ``params.execution``); the other sections of the run's config are fields here, so each setting
    lives in one place and ``config`` assembles the whole ``Config`` from them.  ``name`` says which
    weights these are (a released name or a folder), for the records of results.
    """

    params: network.LGCNParams
    shape_model: ShapeModel | None
    data: DataConfig = DataConfig()
    postprocess: PostprocessConfig = PostprocessConfig()
    train: TrainConfig = TrainConfig()
    name: str = ""

    @classmethod
    def from_config(cls, params: network.LGCNParams, shape_model: ShapeModel | None, config: Config, name: str = "") -> "Model":
        """A model of ``params`` with the other sections of ``config`` (its network must be ``params``')."""
        if config.model != params.config:
            raise ValueError("config.model is not the network of params; pass the config the weights were made with")
        return cls(params.with_execution(config.execution), shape_model, config.data, config.postprocess, config.train, name)

    @property
    def config(self) -> Config:
        """The whole config: the network and execution of ``params`` with this model's other sections."""
        return Config(model=self.params.config, train=self.train, data=self.data, postprocess=self.postprocess,
                      execution=self.params.execution)

    def replace(self, **changes) -> "Model":
        return dataclasses.replace(self, **changes)

    def with_postprocess(self, **settings) -> "Model":
        """This model with other inference settings (fields of ``PostprocessConfig``), e.g.
        ``load_pretrained().with_postprocess(flip_test=True)``; the weights are shared, not copied."""
        fields = {f.name for f in dataclasses.fields(PostprocessConfig)}
        unknown = sorted(set(settings) - fields)
        if unknown:
            raise ValueError(f"unknown postprocess settings {unknown}; fields of PostprocessConfig: {', '.join(sorted(fields))}")
        postprocess = dataclasses.replace(self.postprocess, **settings)
        validate(dataclasses.replace(self.config, postprocess=postprocess))
        return self.replace(postprocess=postprocess)

    def with_execution(self, **settings) -> "Model":
        """This model run another way, same weights: fields of ``ExecutionConfig``, e.g.
        ``load_pretrained().with_execution(compute_dtype="bfloat16")`` (bf16 convolution blocks)."""
        unknown = sorted(set(settings) - EXECUTION_FIELDS)
        if unknown:
            raise ValueError(f"unknown execution settings {unknown}; they are: {', '.join(sorted(EXECUTION_FIELDS))}")
        execution = dataclasses.replace(self.params.execution, **settings)
        validate(dataclasses.replace(self.config, execution=execution))
        return self.replace(params=self.params.with_execution(execution))

    @property
    def execution(self) -> ExecutionConfig:
        return self.params.execution


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


_OUT_TREE = jax.tree.structure((0, 0))  # (landmarks, confidence)


@jit(static_argnames="config")
def _predict(params, images, shape_model, config):
    return postprocess_batch(heatmaps(params, images, config.flip_test), shape_model, config)


def predict_with_confidence(model: Union[Model, network.LGCNParams], images, shape_model: ShapeModel | None = None,
                            config: PostprocessConfig | None = None) -> tuple[jax.Array, jax.Array]:
    """``predict`` that also returns a per-point confidence f32[B, L] (the heatmap value at the chosen peak, ~1 when sure)."""
    if isinstance(model, Model):
        params = model.params
        shape_model = model.shape_model if shape_model is None else shape_model
        config = model.postprocess if config is None else config
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
    devices = jax.local_devices()
    if len(devices) > 1 and images.shape[0] >= len(devices):
        # Split the batch over the local devices; parameters and shape model go to each of them.
        mesh = sharding.data_mesh(devices)
        images, n = sharding.shard_leading(images, mesh)
        params, shape_model = sharding.replicate((params, shape_model), mesh)
        landmarks, confidence = _predict(params, images, shape_model, config)
        return landmarks[:n], confidence[:n]
    if executables.cache_dir():  # a program stored whole by an earlier process: no tracing (lgcn_jax.executables)
        return executables.load_or_compile(_predict, "predict", (params, images, shape_model), (config,), _OUT_TREE)(params, images, shape_model)
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
