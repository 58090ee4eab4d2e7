"""lgcn_jax: the Local-Global Context Network for facial landmarks (Merget et al., CVPR 2018) in JAX.

Functional API::

    params = lgcn_jax.init(jax.random.key(0), lgcn_jax.get_config("paper"))
    heatmaps = lgcn_jax.apply(params, images)      # f32[B, H, W, 1] -> f32[B, H, W, 68]
"""

from lgcn_jax.checkpoint import CheckpointError, load_params
from lgcn_jax.config import Config, DataConfig, ModelConfig, TrainConfig, apply_overrides, get_config
from lgcn_jax.heatmaps import argmax_subpixel, render_targets
from lgcn_jax.kernel_conv import Kernel, kernel_conv, kernel_conv_direct
from lgcn_jax.loss import heatmap_loss
from lgcn_jax.network import LGCNParams, apply, apply_train, init
from lgcn_jax.train import create_train_state, eval_step, train_and_evaluate, train_step

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "Config", "DataConfig", "Kernel", "LGCNParams", "ModelConfig", "TrainConfig",
    "apply", "apply_overrides", "apply_train", "argmax_subpixel", "create_train_state", "eval_step",
    "get_config", "heatmap_loss", "init", "kernel_conv", "kernel_conv_direct", "load_params",
    "render_targets", "train_and_evaluate", "train_step",
]
