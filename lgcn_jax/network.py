"""The LGCN network as pure functions: ``init``, ``apply`` and ``apply_train``.

Local-context subnet (5x5 then 3x3 conv-BN-ReLU blocks) -> two 1x1 heads ->
kernel convolution (fixed 45x45 blur, scaled by 0.01) -> global-context subnet
of dilated 3x3 blocks on both blurred heads -> 1x1 conv, added to the blurred
main head.  The global subnet runs on interleaved sub-grids (``to_phases``): the same function
without dilated convolutions, whose weight gradients miss cuDNN's kernels on GPUs.
docs/architecture.md has the table and its sources.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from lgcn_jax.batch_norm import BNReLUDropout, fold_into_conv
from lgcn_jax.config import Config, ExecutionConfig, ModelConfig
from lgcn_jax.kernel_conv import Kernel, gaussian_mixture_kernel, kernel_conv
from lgcn_jax.xla_options import jit

__all__ = ["LGCNParams", "LGCN", "model_kernel", "to_phases", "from_phases", "init", "apply", "apply_train", "check_images", "batch_statistics", "recalibrate_batch_stats"]


@functools.lru_cache(maxsize=16)
def model_kernel(config: ModelConfig) -> Kernel:
    """The fixed blur kernel of a model config (cached: factorised once)."""
    return Kernel(gaussian_mixture_kernel(config.kernel_size, config.kernel_weights, config.kernel_sigmas))


class LGCN(nn.Module):
    """Flax module; use the functional :func:`init` / :func:`apply` instead."""

    config: ModelConfig
    execution: ExecutionConfig = ExecutionConfig()

    @nn.compact
    def __call__(self, images: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
        m, run = self.config, self.execution
        conv_init = nn.initializers.variance_scaling(2.0 * m.init_scale**2, "fan_in", "normal")
        # execution.compute_dtype: the convolutions' arithmetic and the activations' storage; BatchNorm computes in f32.
        dtype = jnp.dtype(run.compute_dtype)

        # execution.fold_batch_norm: inference with f32 blocks runs each conv -> BatchNorm -> ReLU as one
        # convolution + ReLU (batch_norm.fold_into_conv), which a GPU runs as one cuDNN call.
        fold = (not train and run.fold_batch_norm and m.activation_scale > 0 and dtype == jnp.float32
                and not self.is_initializing())

        def folded(name):
            params, stats = self.variables["params"], self.variables["batch_stats"]
            c, b, s = params[f"{name}_conv"], params[f"{name}_bn"], stats[f"{name}_bn"]
            return fold_into_conv(c["kernel"], c["bias"], b["scale"], b["bias"], s["mean"], s["var"], m.bn_epsilon, m.activation_scale)

        def conv_relu(x, kernel, bias, dilation):
            y = jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", rhs_dilation=(dilation, dilation),
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
            return jnp.maximum(y + bias, 0.0)

        def conv_bn(x, features, size, dilation, name, dtype, dropout_rate):
            conv = nn.Conv(features, (size, size), kernel_dilation=dilation, padding="SAME", kernel_init=conv_init, dtype=dtype, name=f"{name}_conv")
            bn = BNReLUDropout(m.bn_momentum, m.bn_epsilon, m.activation_scale, dropout_rate, dtype, run.fused_batch_norm, name=f"{name}_bn")
            if not fold:
                return bn(conv(x), train)
            return conv_relu(x, *folded(name), dilation)

        def block(x, size, dilation, name):
            return conv_bn(x, m.num_filters, size, dilation, name, dtype, m.dropout_rate)

        # The authors feed 0..255 pixels and map them to (p/128 - 1) * 0.1.
        x = (images * (255.0 / 128.0) - 1.0) * 0.1
        for i in range(m.local_5x5_layers):
            x = block(x, 5, 1, f"local5_{i}")
        for i in range(m.local_3x3_layers):
            x = block(x, 3, 1, f"local3_{i}")
        n = m.num_landmarks
        # The heads, the blur and everything after them stay f32 (dtype=f32 promotes a bf16 input):
        # the maps' sub-pixel peaks are read from small differences of their logs.
        side = conv_bn(x, n, 1, 1, "head_side", jnp.float32, 0.0)
        # One blur call for both heads, at the convolutions' precision (JAX's default: TF32 on recent
        # NVIDIA GPUs, full f32 on CPUs; docs/architecture.md says what TF32 changed).
        kernel = model_kernel(m)
        compose = False  # the main head composed into the first global block (below)
        if run.blur_features and x.shape[-1] + 1 < n and not self.is_initializing():
            # The blur is linear and channel-wise, so blur(x W + b) = blur(x) W + blur(1) b: with fewer
            # features than landmarks, blurring the features (and a map of ones, for the bias under the
            # zero padding) is the same function on fewer channels.
            head = self.variables["params"]["head_main"]
            f = x.shape[-1]
            ones = jnp.ones(x.shape[:-1] + (1,), jnp.float32)
            blurred = kernel_conv(jnp.concatenate([x.astype(jnp.float32), ones, side], axis=-1), kernel, precision=None, batching=run.blur_batching)
            o1 = (blurred[..., :f] @ head["kernel"][0, 0] + blurred[..., f:f + 1] * head["bias"]) * m.kernel_output_scale
            side_blurred = blurred[..., f + 1:] * m.kernel_output_scale
            compose = fold and m.global_layers > 0
        else:
            main = nn.Conv(n, (1, 1), kernel_init=conv_init, dtype=jnp.float32, name="head_main")(x)
            blurred = kernel_conv(jnp.concatenate([main, side], axis=-1), kernel, precision=None, batching=run.blur_batching) * m.kernel_output_scale
            o1, side_blurred = blurred[..., :n], blurred[..., n:]
        d = m.global_dilation
        phases = run.dilation_as_phases and d > 1 and o1.shape[1] % d == 0 and o1.shape[2] % d == 0
        if compose:
            # The first global block's 3x3 convolution is linear in o1, itself linear in the blurred features (no
            # bias: the blurred map of ones carries it, zero in the padding as o1 is): composed, the block reads
            # the f + 1 + n blurred channels instead of 2n.
            k0, b0 = folded("global_0")
            w = jnp.concatenate([head["kernel"][0, 0], head["bias"][None]], axis=0)  # [f + 1, n]
            k0 = jnp.concatenate([jnp.einsum("ic,hwco->hwio", w, k0[:, :, :n]), k0[:, :, n:]], axis=2) * m.kernel_output_scale
            y = conv_relu(to_phases(blurred, d) if phases else blurred, k0, b0, 1 if phases else d)
        else:
            maps = jnp.concatenate([o1, side_blurred], axis=-1)
            y = to_phases(maps, d) if phases else maps
        for i in range(int(compose), m.global_layers):
            y = block(y, 3, 1 if phases else d, f"global_{i}")
        g = nn.Conv(n, (1, 1), kernel_init=conv_init, dtype=jnp.float32, name="head_global")(y)
        o2 = (from_phases(g, d) if phases else g) + o1
        return o1, o2


def to_phases(x: jax.Array, d: int) -> jax.Array:
    """f32[B, H, W, C] -> f32[B*d*d, H/d, W/d, C]: the d x d interleaved sub-grids of x as separate images.

    A 3x3 convolution with dilation d reads only pixels of the sub-grid of its output pixel, and
    SAME zero padding of x is SAME zero padding of every sub-grid (H and W must divide by d).  So
    it equals a plain 3x3 convolution on the sub-grids, and BatchNorm, ReLU and 1x1 convolutions
    see the same pixels in another order.  Why bother: the weight gradient of a dilated
    convolution is a strided convolution with an HxW window, which XLA's GPU backend does not
    hand to cuDNN's backward-filter kernels (it matches stride 1 only); plain 3x3 convolutions
    get the tuned kernels in both directions.
    """
    b, h, w, c = x.shape
    x = x.reshape(b, h // d, d, w // d, d, c)
    return x.transpose(0, 2, 4, 1, 3, 5).reshape(b * d * d, h // d, w // d, c)


def from_phases(y: jax.Array, d: int) -> jax.Array:
    """Inverse of :func:`to_phases`: f32[B*d*d, H/d, W/d, C] -> f32[B, H, W, C]."""
    n, h, w, c = y.shape
    y = y.reshape(n // (d * d), d, d, h, w, c)
    return y.transpose(0, 3, 1, 4, 2, 5).reshape(n // (d * d), h * d, w * d, c)


@struct.dataclass
class LGCNParams:
    """All state of a network: trainable ``params``, BatchNorm ``batch_stats``, and as static data the
    network's ``config`` and how it runs (``execution``).

    A pytree: its leaves are the arrays, the configs ride along as static data,
    so ``jax.jit(apply)(p, x)`` and ``jax.vmap(apply, (None, 0))`` just work.
    """

    params: Any
    batch_stats: Any
    config: ModelConfig = struct.field(pytree_node=False)
    execution: ExecutionConfig = struct.field(pytree_node=False, default=ExecutionConfig())

    def with_execution(self, execution: ExecutionConfig) -> "LGCNParams":
        """The same arrays, run another way."""
        return self.replace(execution=execution)

    @property
    def variables(self) -> dict:
        return {"params": self.params, "batch_stats": self.batch_stats}

    def num_parameters(self) -> int:
        return sum(x.size for x in jax.tree_util.tree_leaves(self.params))


def _configs(config) -> tuple[ModelConfig, ExecutionConfig]:
    if isinstance(config, Config):
        return config.model, config.execution
    if isinstance(config, ModelConfig):
        return config, ExecutionConfig()
    raise TypeError(f"expected a Config or ModelConfig, got {type(config).__name__}")


def init(rng: jax.Array, config: Config | ModelConfig, image_size: int = 96) -> LGCNParams:
    """Fresh network parameters.

    Args:
      rng: a PRNG key.
      config: a :class:`Config` (its ``model`` and ``execution`` parts are used) or a :class:`ModelConfig`.
      image_size: side of the dummy input used to trace shapes; weights do not depend on it.
    """
    m, run = _configs(config)
    dummy = jnp.zeros((1, image_size, image_size, 1), jnp.float32)
    variables = jax.jit(functools.partial(LGCN(m, run).init, train=False))(rng, dummy)
    return LGCNParams(params=variables["params"], batch_stats=variables.get("batch_stats", {}), config=m, execution=run)


def check_images(images: Any) -> jax.Array | np.ndarray:
    """Validate and convert images to f32[B, H, W, 1] in [0, 1] (uint8 is divided by 255).

    NumPy input stays NumPy (converted on the host: eager device ops would each compile a small program in a
    fresh process); anything else becomes a ``jax.Array``."""
    xp = np if isinstance(images, (np.ndarray, np.generic, list, tuple)) else jnp
    images = xp.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 1:
        raise ValueError(
            f"images must have shape [B, H, W, 1] (grayscale, channels last), got {tuple(images.shape)}; "
            "add axes with images[None, ..., None] or convert RGB to gray first"
        )
    if 0 in images.shape:
        raise ValueError(f"images of shape {tuple(images.shape)} hold no pixels")
    if images.dtype == np.uint8:
        return images.astype(np.float32) / np.float32(255.0)
    return images.astype(np.float32)


@jit
def _apply(params: LGCNParams, images: jax.Array) -> jax.Array:
    return LGCN(params.config, params.execution).apply(params.variables, images, train=False)[1]


def apply(params: LGCNParams, images: jax.Array) -> jax.Array:
    """Heatmaps of the full network (inference mode).

    Args:
      params: from :func:`init` or a checkpoint.
      images: f32[B, H, W, 1] in [0, 1] (or uint8 0..255); any H, W.

    Returns:
      f32[B, H, W, num_landmarks]: blurred heatmaps, about 1 at a landmark.
    """
    if not isinstance(params, LGCNParams):
        raise TypeError(f"apply takes LGCNParams (from init, or a Model's .params), got {type(params).__name__}"
                        + ("; pass model.params, or use lgcn_jax.predict(model, images) for landmarks" if hasattr(params, "params") else ""))
    return _apply(params, check_images(images))


def apply_train(params: LGCNParams, images: jax.Array, dropout_rng: jax.Array) -> tuple[jax.Array, jax.Array, Any]:
    """Training-mode forward pass: batch statistics and dropout.

    Returns (o1, o2, new_batch_stats): o1 the blurred local-context output,
    o2 the final output, both f32[B, H, W, num_landmarks].
    """
    (o1, o2), updates = LGCN(params.config, params.execution).apply(
        params.variables, images, train=True, rngs={"dropout": dropout_rng}, mutable=["batch_stats"]
    )
    return o1, o2, updates["batch_stats"]


@jit
def batch_statistics(params: LGCNParams, images: jax.Array) -> Any:
    """BatchNorm statistics of one batch images f32[B, H, W, 1]: a ``batch_stats`` tree of per-channel mean and var.

    Training-mode normalisation without dropout, as inference sees the network.
    """
    m = dataclasses.replace(params.config, dropout_rate=0.0, bn_momentum=0.0)  # momentum 0: the batch's own statistics
    _, updates = LGCN(m, params.execution).apply(params.variables, images, train=True, mutable=["batch_stats"])
    return updates["batch_stats"]


def recalibrate_batch_stats(params: LGCNParams, image_batches) -> LGCNParams:
    """Replace the stored BatchNorm statistics by population statistics over many batches ("precise BN").

    Training keeps the statistics of the last batch only (momentum 0, the authors' setting);
    inference is steadier with the mean over K batches: mean = E_k[mean_k] and
    var = E_k[var_k + mean_k^2] - mean^2 (the variance of all pixels of all K batches).

    Args:
      image_batches: an iterable of f32[B, H, W, 1] (or u8) batches of equal size, e.g. training crops.
    """
    total, count = None, 0
    for images in image_batches:
        stats = batch_statistics(params, check_images(images))
        moments = {name: (s["mean"], s["var"] + s["mean"] ** 2) for name, s in stats.items()}
        total = moments if total is None else jax.tree_util.tree_map(jnp.add, total, moments)
        count += 1
    if count == 0:
        raise ValueError("recalibrate_batch_stats needs at least one batch")
    stats = {}
    for name, (m, q) in total.items():
        mean = m / count
        stats[name] = {"mean": mean, "var": jnp.maximum(q / count - mean**2, 0.0)}
    return params.replace(batch_stats=stats)
