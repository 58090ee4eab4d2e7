"""The LGCN kernel convolution: a fixed, channel-wise 2D blur of every heatmap.

The op is ``out[b, i, j, c] = sum_{a, d} K[a, d] * x[b, i + a - ci, j + d - cj, c]``
(cross-correlation, zero padding, output the size of the input), the same
function as a depthwise ``lax.conv_general_dilated`` with SAME padding.

Why it is fast: a KxK kernel of rank R is a sum of R separable kernels
``K = sum_r u_r v_r^T`` (SVD).  Each separable pass along one axis of length N
is a product with a banded N x N Toeplitz matrix, so the whole blur is two
batched matmuls whose contraction runs over R*N, not a 2025-tap stencil.
The kernel shipped with LGCN (a mixture of Gaussians) has rank 3; an
arbitrary kernel is handled exactly, only with more rank terms (at most K).
Matmuls are what CPUs and GPUs do best, so this beats both the direct
depthwise convolution and separable depthwise passes (see bench/).
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lgcn_jax.config import BLUR_BATCHING

__all__ = [
    "Kernel",
    "gaussian_mixture_kernel",
    "kernel_conv",
    "kernel_conv_direct",
]


def gaussian_mixture_kernel(size: int, weights: Sequence[float], sigmas: Sequence[float]) -> np.ndarray:
    """Isotropic mixture ``sum_k w_k exp(-r^2 / (2 s_k^2))`` on a size x size grid.

    Returns f64[size, size], centred on the middle pixel (size must be odd).
    """
    if size < 1 or size % 2 == 0:
        raise ValueError(f"kernel size must be a positive odd number, got {size}")
    if len(weights) != len(sigmas) or not weights:
        raise ValueError(f"need as many kernel weights as sigmas (got {len(weights)} and {len(sigmas)})")
    if min(sigmas) <= 0:
        raise ValueError(f"kernel sigmas must be positive, got {tuple(sigmas)}")
    c = size // 2
    yy, xx = np.mgrid[-c : c + 1, -c : c + 1].astype(np.float64)
    r2 = yy * yy + xx * xx
    return sum(w * np.exp(-r2 / (2.0 * s * s)) for w, s in zip(weights, sigmas))


class Kernel:
    """A fixed 2D kernel with its separable factorisation, usable as a jit static arg.

    Hash and equality go by the kernel's values, so two equal kernels share one
    compiled function.
    """

    def __init__(self, values: np.ndarray, rtol: float = 1e-7):
        values = np.asarray(values, dtype=np.float64)
        if values.ndim != 2 or values.shape[0] % 2 == 0 or values.shape[1] % 2 == 0:
            raise ValueError(f"kernel must be a 2D array with odd sides, got shape {values.shape}")
        if not np.all(np.isfinite(values)):
            raise ValueError("kernel has non-finite values")
        self.values = values
        self.values.setflags(write=False)
        u, s, vt = np.linalg.svd(values)
        # Keep every singular value that matters at f32 precision; the dropped
        # tail bounds the error by sum(s[rank:]) / s[0] relative to the kernel.
        keep = s > rtol * s[0] if s[0] > 0 else np.zeros_like(s, dtype=bool)
        rank = max(1, int(keep.sum()))
        root = np.sqrt(s[:rank])
        self.col_taps = (u[:, :rank] * root).T  # f64[R, Kh]: taps along H
        self.row_taps = (vt[:rank, :].T * root).T  # f64[R, Kw]: taps along W
        self._key = (values.shape, values.tobytes(), rtol)

    def flipped(self) -> "Kernel":
        """The kernel turned by 180 degrees: the blur's transpose (the same kernel when it is symmetric)."""
        return Kernel(self.values[::-1, ::-1], self._key[2])

    @property
    def shape(self) -> tuple[int, int]:
        return self.values.shape

    @property
    def rank(self) -> int:
        return self.col_taps.shape[0]

    def __hash__(self) -> int:
        return hash(self._key)

    def __eq__(self, other) -> bool:
        return isinstance(other, Kernel) and self._key == other._key

    def __repr__(self) -> str:
        return f"Kernel(shape={self.shape}, rank={self.rank})"

    @functools.lru_cache(maxsize=32)
    def toeplitz(self, axis: int, n: int) -> np.ndarray:
        """f32[R, n, n] banded matrices T with (T @ x)[i] = sum_a taps[a] x[i + a - c]."""
        taps = self.col_taps if axis == 0 else self.row_taps
        k = taps.shape[1]
        c = k // 2
        i = np.arange(n)[:, None]
        p = np.arange(n)[None, :]
        a = p - i + c  # tap index that links output i to input p
        valid = (a >= 0) & (a < k)
        t = np.where(valid[None], taps[:, np.clip(a, 0, k - 1)], 0.0)
        return t.astype(np.float32)


def _as_kernel(kernel) -> Kernel:
    return kernel if isinstance(kernel, Kernel) else Kernel(np.asarray(kernel))


def _blur_batch(x: jax.Array, kernel: Kernel, precision) -> jax.Array:
    b, h, w, c = x.shape
    r = kernel.rank
    # Both passes are batched matmuls that read and write x's own NHWC layout, so no layout
    # transpose of a map-sized array is needed (the einsum form "rwq,bhqc->bhrwc" made XLA move
    # x and the R-times-larger intermediate through transposes: twice the blur's memory traffic
    # in a GPU-compiled training step, bench/gpu_hlo_offline.py).  Pass 1 along H, one matmul per
    # image, with the rank terms laid out beside H': [(H' R), H] @ [H, (W C)].  Then R and W are
    # adjacent, so pass 2 contracts them together (the sum over rank terms is part of that
    # matmul) per image row: [W', (R W)] @ [(R W), C].  The Toeplitz factors are broadcast over
    # the batch axes; XLA's GPU backend folds that into cuBLAS as a zero batch stride.
    th = jnp.asarray(kernel.toeplitz(0, h).transpose(1, 0, 2).reshape(h * r, h), x.dtype)  # [(H' R), H]
    tw = jnp.asarray(kernel.toeplitz(1, w).transpose(1, 0, 2).reshape(w, r * w), x.dtype)  # [W', (R W)]
    y = jax.lax.dot_general(jnp.broadcast_to(th, (b, h * r, h)), x.reshape(b, h, w * c),
                            (((2,), (1,)), ((0,), (0,))), precision=precision)  # [B, (H' R), (W C)]
    return jax.lax.dot_general(jnp.broadcast_to(tw, (b, h, w, r * w)), y.reshape(b, h, r * w, c),
                               (((3,), (2,)), ((0, 1), (0, 1))), precision=precision)  # [B, H', W', C]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _blur_each(x: jax.Array, kernel: Kernel, precision) -> jax.Array:
    # XLA's CPU backend runs the two matmuls well for one image, whose R-times-larger intermediate
    # stays in cache, and slower per image for a batch (bench/bench_kernel_conv.py), so on a CPU
    # the images go one at a time.
    return jax.lax.map(lambda image: _blur_batch(image[None], kernel, precision)[0], x)


def _blur_each_fwd(x, kernel, precision):
    return _blur_each(x, kernel, precision), None


def _blur_each_bwd(kernel, precision, _, cotangent):
    # The blur is linear and its transpose is the blur by the flipped kernel (zero padding, odd
    # sides), so the backward pass runs one image at a time too; autodiff's transpose of the
    # loop above was slower in a training step than the batched matmuls it replaces.
    return (_blur_each(cotangent, kernel.flipped(), precision),)


_blur_each.defvjp(_blur_each_fwd, _blur_each_bwd)


@functools.partial(jax.jit, static_argnames=("kernel", "precision", "batching"))
def _kernel_conv(x: jax.Array, kernel: Kernel, precision, batching: str) -> jax.Array:
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    one = isinstance(x.shape[0], int) and x.shape[0] == 1  # False for a symbolic batch (export)
    if batching == "batch" or one:
        return _blur_batch(x, kernel, precision)
    if batching == "image":
        return _blur_each(x, kernel, precision)
    # "auto": chosen when the program is lowered for its platform, so the compiler sees one branch only.
    return jax.lax.platform_dependent(x, cpu=lambda x: _blur_each(x, kernel, precision),
                                      default=lambda x: _blur_batch(x, kernel, precision))


def kernel_conv(x: jax.Array, kernel, precision=jax.lax.Precision.HIGHEST, batching: str = "auto") -> jax.Array:
    """Blur every channel of ``x`` with one fixed kernel (zero padding, SAME size).

    Args:
      x: f32[B, H, W, C] maps (any H, W, C).
      kernel: a :class:`Kernel` or a 2D array with odd sides (converted once;
        pass a ``Kernel`` to avoid re-factorising on every call).
      precision: of the two matmuls, as for ``jnp.einsum``.  Full f32 by default; ``None`` follows
        JAX's default matmul precision (TF32 on recent NVIDIA GPUs, as the network's convolutions
        use; the same as full f32 on CPUs).
      batching: "image" runs the matmuls one image at a time, "batch" once for the whole batch, "auto"
        (default) the first on a CPU and the second on other platforms (``ExecutionConfig.blur_batching``).

    Returns:
      f32[B, H, W, C], equal to :func:`kernel_conv_direct` up to float rounding.
    """
    x = jnp.asarray(x)
    if x.ndim != 4:
        raise ValueError(f"kernel_conv expects x of shape [B, H, W, C], got {x.shape}")
    if batching not in BLUR_BATCHING:
        raise ValueError(f"batching must be one of {', '.join(map(repr, BLUR_BATCHING))}, got {batching!r}")
    return _kernel_conv(x, _as_kernel(kernel), precision, batching)


@functools.partial(jax.jit, static_argnames="kernel")
def _kernel_conv_direct(x: jax.Array, kernel: Kernel) -> jax.Array:
    c = x.shape[-1]
    kh, kw = kernel.shape
    rhs = jnp.broadcast_to(jnp.asarray(kernel.values, x.dtype)[:, :, None, None], (kh, kw, 1, c))
    return jax.lax.conv_general_dilated(
        x,
        rhs,
        window_strides=(1, 1),
        padding=((kh // 2, kh // 2), (kw // 2, kw // 2)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=c,
        precision=jax.lax.Precision.HIGHEST,
    )


def kernel_conv_direct(x: jax.Array, kernel) -> jax.Array:
    """Reference: the same blur as a direct depthwise convolution (slow; for tests and benchmarks)."""
    return _kernel_conv_direct(jnp.asarray(x), _as_kernel(kernel))
