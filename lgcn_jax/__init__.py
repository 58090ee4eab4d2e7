"""lgcn_jax: the Local-Global Context Network for facial landmarks (Merget et al., CVPR 2018) in JAX.

Functional API::

    params = lgcn_jax.init(jax.random.key(0), lgcn_jax.get_config("paper"))
    heatmaps = lgcn_jax.apply(params, images)      # f32[B, H, W, 1] -> f32[B, H, W, 68]

    model = lgcn_jax.load_model("ckpt")            # params + PCA shape model + config
    landmarks = lgcn_jax.predict(model, images)    # f32[B, 68, 2], network + post-processing in one jit

    faces = lgcn_jax.detect("photo.jpg")           # every face: box, 68 landmarks in photo pixels, confidence
    for faces in lgcn_jax.track(frames): ...       # video: faces followed from frame to frame (Face.track_id)
"""

from lgcn_jax.checkpoint import CheckpointError, load_params
from lgcn_jax.config import Config, DataConfig, ModelConfig, PostprocessConfig, TrainConfig, apply_overrides, get_config
from lgcn_jax.heatmaps import argmax_subpixel, render_targets
from lgcn_jax.image_io import ImageError
from lgcn_jax.input_pipeline import DatasetError
from lgcn_jax.kernel_conv import Kernel, kernel_conv, kernel_conv_direct
from lgcn_jax.loss import heatmap_loss
from lgcn_jax.network import LGCNParams, apply, apply_train, init
from lgcn_jax.postprocess import postprocess, postprocess_with_confidence
from lgcn_jax.predict import Model, export_model, load_model, load_pretrained, predict, predict_with_confidence
from lgcn_jax.detect import Face, detect, detect_batch
from lgcn_jax.shape_model import ShapeModel, ShapeModelError, build_shape_model, load_shape_model, save_shape_model
from lgcn_jax.train import create_train_state, eval_step, train_and_evaluate, train_step
from lgcn_jax.track import Tracker, track

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "Config", "DataConfig", "DatasetError", "Face", "ImageError", "Kernel", "LGCNParams", "Model", "ModelConfig", "PostprocessConfig",
    "ShapeModel", "ShapeModelError", "TrainConfig", "Tracker",
    "apply", "apply_overrides", "apply_train", "argmax_subpixel", "build_shape_model", "create_train_state", "detect", "detect_batch", "eval_step", "export_model",
    "get_config", "heatmap_loss", "init", "kernel_conv", "kernel_conv_direct", "load_model", "load_params", "load_pretrained",
    "load_shape_model", "postprocess", "postprocess_with_confidence", "predict", "predict_with_confidence",
    "render_targets", "save_shape_model", "track", "train_and_evaluate", "train_step",
]
