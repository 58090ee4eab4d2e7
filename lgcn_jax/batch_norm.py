"""BatchNorm -> ReLU -> scale -> dropout as one op with a hand-written backward pass.

Every block of the network ends in ``dropout(relu(batch_norm(x)) * s)``.  Left to autodiff, that
chain keeps five f32 and two bool activation-sized arrays per block for the backward pass (the
squares, the centred input, broadcasts, the ReLU and dropout masks; as ``jax.ad_checkpoint.
print_saved_residuals`` lists them, before XLA fuses and recomputes what it can).  Written as
one ``jax.custom_vjp``, the backward pass needs only the convolution output ``x``, which the
convolution wrote anyway, and the dropout mask (bool), and computes, per channel, with ``xhat = (x - mean) *
inv_std`` and ``gz`` the gradient reaching the normalised value ``z = xhat * scale + bias``::

    dbias  = sum(gz)            dscale = sum(gz * xhat)
    dx     = scale * inv_std * (gz - dbias / N - xhat * dscale / N)

that is, one reduction pass and one element-wise pass over (cotangent, x, mask).  The forward
pass is the same arithmetic as flax's ``nn.BatchNorm`` (statistics as mean(x) and
mean(x^2) - mean(x)^2 in f32, whatever the input dtype), ``nn.relu`` and ``nn.Dropout``.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["bn_relu_dropout", "fold_into_conv", "BNReLUDropout"]


def _stats(xf: jax.Array) -> tuple[jax.Array, jax.Array]:
    axes = tuple(range(xf.ndim - 1))
    mean = xf.mean(axes)
    var = jnp.maximum(0.0, (xf * xf).mean(axes) - mean * mean)
    return mean, var


def _normalized(xf, mean, inv, scale, bias):
    """z = (x - mean) * inv_std * scale + bias, in the order flax's nn.BatchNorm computes it."""
    return (xf - mean) * (inv * scale) + bias


def _forward(x, scale, bias, keep, epsilon, activation_scale, keep_prob):
    xf = x.astype(jnp.float32)
    mean, var = _stats(xf)
    inv = jax.lax.rsqrt(var + epsilon)
    y = jnp.maximum(_normalized(xf, mean, inv, scale, bias), 0.0) * activation_scale
    if keep is not None:
        y = jnp.where(keep, y / keep_prob, 0.0)
    return y.astype(x.dtype), mean, var, inv


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _bn_relu_dropout(x, scale, bias, keep, epsilon, activation_scale, keep_prob):
    y, mean, var, _ = _forward(x, scale, bias, keep, epsilon, activation_scale, keep_prob)
    return y, mean, var


def _fwd(x, scale, bias, keep, epsilon, activation_scale, keep_prob):
    y, mean, var, inv = _forward(x, scale, bias, keep, epsilon, activation_scale, keep_prob)
    return (y, mean, var), (x, keep, scale, bias, mean, inv)


def _bwd(epsilon, activation_scale, keep_prob, residuals, cotangents):
    x, keep, scale, bias, mean, inv = residuals
    gy, gmean, gvar = cotangents
    axes = tuple(range(x.ndim - 1))
    n = x.size // x.shape[-1]
    xf = x.astype(jnp.float32)
    centred = xf - mean
    xhat = centred * inv
    on = _normalized(xf, mean, inv, scale, bias) > 0  # z > 0, computed as the forward pass did
    factor = activation_scale
    if keep is not None:
        on, factor = on & keep, factor / keep_prob
    gz = jnp.where(on, gy.astype(jnp.float32) * factor, 0.0)
    dbias = gz.sum(axes)
    dscale = (gz * xhat).sum(axes)
    # The statistics are outputs too (the running averages); their cotangents are usually zero,
    # but are honoured: d mean / dx = 1/N, d var / dx = 2 (x - mean) / N.
    dx = (scale * inv) * (gz - dbias / n - xhat * (dscale / n)) + (gmean + 2.0 * gvar * centred) / n
    return dx.astype(x.dtype), dscale, dbias, None


_bn_relu_dropout.defvjp(_fwd, _bwd)


def bn_relu_dropout(x: jax.Array, scale: jax.Array, bias: jax.Array, keep: jax.Array | None, *, epsilon: float,
                    activation_scale: float, keep_prob: float = 1.0) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Training-mode ``dropout(relu(batch_norm(x)) * activation_scale)`` with batch statistics.

    Args:
      x: f32 or bf16[..., C]; statistics run over every axis but the last, in f32.
      scale, bias: f32[C], BatchNorm's affine parameters.
      keep: bool[x.shape] dropout mask (True keeps; kept values are divided by ``keep_prob``), or
        None for no dropout.
      epsilon: added to the variance.
      activation_scale: the constant the ReLU output is multiplied by.
      keep_prob: 1 - dropout rate.

    Returns:
      (y, mean, var): y of x's dtype and shape; mean, var f32[C], the batch statistics (biased
      variance), as flax's ``nn.BatchNorm`` computes them.
    """
    if keep is not None and keep.shape != x.shape:
        raise ValueError(f"dropout mask of shape {keep.shape} does not match x of shape {x.shape}")
    return _bn_relu_dropout(x, scale, bias, keep, float(epsilon), float(activation_scale), float(keep_prob))


def fold_into_conv(kernel: jax.Array, conv_bias: jax.Array, scale: jax.Array, bias: jax.Array, mean: jax.Array,
                   var: jax.Array, epsilon: float, activation_scale: float) -> tuple[jax.Array, jax.Array]:
    """A convolution followed by inference-mode BatchNorm, ReLU and the activation scale, as one convolution + ReLU.

    ``relu(bn(conv(x, kernel) + conv_bias)) * a == relu(conv(x, kernel') + bias')`` for ``a > 0``, with
    ``g = scale * rsqrt(var + epsilon) * a`` per output channel, ``kernel' = kernel * g`` and
    ``bias' = (conv_bias - mean) * g + bias * a``.  Why: a GPU compile then runs every block as one
    cuDNN convolution with bias and ReLU fused, where the unfolded block writes and rereads the
    convolution output for the element-wise BatchNorm pass.

    Args:
      kernel: f32[..., C_in, C] (HWIO); conv_bias, scale, bias, mean, var: f32[C].
    Returns:
      (kernel' f32[..., C_in, C], bias' f32[C]).
    """
    if not activation_scale > 0:
        raise ValueError(f"folding needs a positive activation_scale (relu(a z) = a relu(z)), got {activation_scale}")
    g = scale * jax.lax.rsqrt(var + epsilon) * activation_scale
    return kernel * g, (conv_bias - mean) * g + bias * activation_scale


class BNReLUDropout(nn.Module):
    """``nn.BatchNorm`` + ReLU + scale + ``nn.Dropout`` in one module.

    Its variables are those of ``nn.BatchNorm`` (params ``scale``, ``bias``; batch_stats ``mean``,
    ``var``), so checkpoints are interchangeable.  In training it normalises with the batch's
    statistics through :func:`bn_relu_dropout` (with ``fused=False``, through the same arithmetic left
    to autodiff); otherwise with the running averages, and no dropout.
    """

    momentum: float
    epsilon: float
    activation_scale: float
    dropout_rate: float = 0.0
    dtype: jnp.dtype = jnp.float32
    fused: bool = True  # False: the same forward arithmetic, differentiated by autodiff

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        x = x.astype(self.dtype)
        if not train:
            z = _normalized(x.astype(jnp.float32), ra_mean.value, jax.lax.rsqrt(ra_var.value + self.epsilon), scale, bias)
            return (jnp.maximum(z, 0.0) * self.activation_scale).astype(self.dtype)
        keep = None
        if self.dropout_rate > 0:
            keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - self.dropout_rate, x.shape)
        if self.fused:
            y, mean, var = bn_relu_dropout(x, scale, bias, keep, epsilon=self.epsilon, activation_scale=self.activation_scale,
                                           keep_prob=1.0 - self.dropout_rate)
        else:
            y, mean, var, _ = _forward(x, scale, bias, keep, self.epsilon, self.activation_scale, 1.0 - self.dropout_rate)
        if not self.is_initializing():
            ra_mean.value = self.momentum * ra_mean.value + (1.0 - self.momentum) * mean
            ra_var.value = self.momentum * ra_var.value + (1.0 - self.momentum) * var
        return y
