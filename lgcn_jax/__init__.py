"""lgcn_jax: the Local-Global Context Network for facial landmarks (Merget et al., CVPR 2018) in JAX.

    faces = lgcn_jax.detect("photo.jpg")           # every face: box, 68 landmarks in photo pixels, confidence
    for faces in lgcn_jax.track(frames): ...       # video: faces followed from frame to frame (Face.track_id)

    model = lgcn_jax.load_model("ckpt")            # params + PCA shape model + config
    landmarks = lgcn_jax.predict(model, images)    # f32[B, 68, 2], network + post-processing in one jit

    params = lgcn_jax.init(jax.random.key(0), lgcn_jax.get_config("paper"))
    heatmaps = lgcn_jax.apply(params, images)      # f32[B, H, W, 1] -> f32[B, H, W, 68]

    lgcn_jax.export_onnx("300w_cpu", "lgcn.onnx")   # for ONNX Runtime (export_tflite: LiteRT), docs/export.md
    lgcn_jax.decode_numpy.decode(heatmaps, shape_model, postprocess)   # the full decoding in NumPy
    lgcn_jax.extract(["faces/"], "out")            # a dataset: a resumable job on Ray Data, a Parquet table
    table = lgcn_jax.read_landmarks("out")         # one row per face (pandas)

The training API (``train_and_evaluate``, ``train_step``, ``create_train_state``, ``eval_step``), the exporters,
``decode_numpy`` and the dataset job (``extract``, ``read_landmarks``) are loaded on first use, so that inference
does not import the optimiser and checkpointing libraries, nor the export tools or Ray (the [export] and [extract]
extras).
"""

from __future__ import annotations

import importlib

from lgcn_jax.compilation_cache import enable_compilation_cache
from lgcn_jax.config import (Config, DataConfig, ExecutionConfig, ModelConfig, PostprocessConfig, TrainConfig, apply_overrides,
                             get_config)
from lgcn_jax.detect import Face, detect, detect_batch
from lgcn_jax.errors import CheckpointError, DatasetError, ImageError, ShapeModelError, VideoError
from lgcn_jax.executables import enable_program_store
from lgcn_jax.heatmaps import argmax_subpixel, render_targets
from lgcn_jax.kernel_conv import Kernel, kernel_conv, kernel_conv_direct
from lgcn_jax.loss import heatmap_loss
from lgcn_jax.network import LGCNParams, apply, apply_train, init
from lgcn_jax.postprocess import postprocess, postprocess_with_confidence
from lgcn_jax.predict import Model, predict, predict_with_confidence
from lgcn_jax.release import default_model, export_model, load_model, load_params, load_pretrained
from lgcn_jax.shape_model import ShapeModel, build_shape_model, load_shape_model, save_shape_model
from lgcn_jax.track import Tracker, track

__version__ = "0.2.0"

# Loaded on first use (PEP 562): name -> module holding it (a module of that name is the module itself).
_LAZY = {"train_and_evaluate": "lgcn_jax.train", "train_step": "lgcn_jax.step", "create_train_state": "lgcn_jax.train_state",
         "eval_step": "lgcn_jax.evaluation", "export_onnx": "lgcn_jax.export", "export_tflite": "lgcn_jax.export",
         "decode_numpy": "lgcn_jax.decode_numpy", "extract": "lgcn_jax.extraction", "read_landmarks": "lgcn_jax.extraction"}


def __getattr__(name: str):
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name])
        value = module if module.__name__ == f"{__name__}.{name}" else getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lgcn_jax' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "CheckpointError", "Config", "DataConfig", "DatasetError", "ExecutionConfig", "Face", "ImageError", "Kernel", "LGCNParams",
    "Model", "ModelConfig", "PostprocessConfig", "ShapeModel", "ShapeModelError", "TrainConfig", "Tracker", "VideoError", "apply",
    "apply_overrides", "apply_train", "argmax_subpixel", "build_shape_model", "create_train_state", "decode_numpy",
    "default_model", "detect", "detect_batch", "enable_compilation_cache", "enable_program_store", "eval_step", "export_model", "export_onnx",
    "export_tflite", "extract", "get_config", "heatmap_loss", "init", "kernel_conv", "kernel_conv_direct", "load_model", "load_params",
    "load_pretrained", "load_shape_model", "postprocess", "postprocess_with_confidence", "predict", "predict_with_confidence", "read_landmarks",
    "render_targets", "save_shape_model", "track", "train_and_evaluate", "train_step",
]
