"""The PCA 2D shape model of the post-processing, learned from training landmarks.

Following the authors' MATLAB post-processing (docs/architecture.md, source [M]):

* every training shape is rotated about the image centre onto a reference
  shape (Kabsch, rotation only: the crops already fix position and scale,
  and the model keeps their residual variation);
* mean shape and the principal components of the aligned shapes (12 by
  default);
* order constraints: for each axis, every pair (i, j) with coordinate i below
  coordinate j on *every* aligned training shape.  We keep only the
  transitive reduction of that order (drop i < j when some k has i < k < j):
  the feasible set is the same, with a fraction of the rows.

The model is a pytree (``jax.jit``/``vmap`` see its arrays) and is saved as
``shape_model.npz`` beside the checkpoint.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from lgcn_jax.errors import ShapeModelError
from lgcn_jax.files import atomic_path

__all__ = ["ShapeModel", "build_shape_model", "kabsch_angle", "rotate", "save_shape_model", "load_shape_model", "ShapeModelError", "empty_shape_model"]

FILENAME = "shape_model.npz"


@struct.dataclass
class ShapeModel:
    """Mean shape, principal components and order constraints.

    Attributes:
      mean: f32[L, 2] aligned mean shape, (x, y) pixels of an image_size^2 heatmap.
      components: f32[K, L, 2] principal directions scaled by their standard deviation,
        so coefficients are in units of training standard deviations.
      lower, upper: i32[M] indices into the flattened f32[L*2] shape: shape[lower] <= shape[upper]
        held strictly on every training shape.
      image_size: the heatmap side the coordinates refer to.
    """

    mean: jax.Array
    components: jax.Array
    lower: jax.Array
    upper: jax.Array
    image_size: int = struct.field(pytree_node=False)

    @property
    def num_components(self) -> int:
        return int(self.components.shape[0])

    @property
    def num_landmarks(self) -> int:
        return int(self.mean.shape[0])


def empty_shape_model(num_landmarks: int, image_size: int) -> ShapeModel:
    """A stand-in with no components or constraints, for arg-max-only decoding (its arrays are never read)."""
    return ShapeModel(jnp.zeros((num_landmarks, 2)), jnp.zeros((1, num_landmarks, 2)), jnp.zeros((0,), jnp.int32),
                      jnp.zeros((0,), jnp.int32), image_size)


def kabsch_angle(source, target, weights=None, xp=jnp):
    """Angle of the rotation that best maps centred ``source`` onto centred ``target``.

    Args:
      source, target: f[..., L, 2]; weights: f[..., L] (default all 1).
    Returns:
      f[...] angle in radians (counter-clockwise in (x, y) axes).  In 2D the
      Kabsch SVD reduces to one atan2, with no reflection case to handle.
    """
    if weights is None:
        weights = xp.ones(source.shape[:-1], source.dtype)
    wsum = xp.maximum(weights.sum(-1, keepdims=True), 1e-12)
    a = source - (weights[..., None] * source).sum(-2, keepdims=True) / wsum[..., None]
    b = target - (weights[..., None] * target).sum(-2, keepdims=True) / wsum[..., None]
    cross = (weights * (a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0])).sum(-1)
    dot = (weights * (a[..., 0] * b[..., 0] + a[..., 1] * b[..., 1])).sum(-1)
    return xp.arctan2(cross, dot)


def rotation_matrix(theta, xp=jnp):
    c, s = xp.cos(theta), xp.sin(theta)
    return xp.stack([xp.stack([c, -s], -1), xp.stack([s, c], -1)], -2)


def rotate(points, theta, center, xp=jnp):
    """Rotate f[..., L, 2] points by ``theta`` f[...] about ``center`` f[2]."""
    r = rotation_matrix(theta, xp)
    return xp.einsum("...ij,...lj->...li", r, points - center) + center


def _order_constraints(aligned: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Transitive reduction of the coordinate orders that hold on every shape."""
    n, num_l, _ = aligned.shape
    lower, upper = [], []
    for axis in range(2):
        c = aligned[:, :, axis]
        always = np.all(c[:, :, None] < c[:, None, :], axis=0)  # always[i, j]: c_i < c_j on all shapes
        implied = (always.astype(np.int32) @ always.astype(np.int32)) > 0
        keep = always & ~implied
        i, j = np.nonzero(keep)
        lower.append(i * 2 + axis)
        upper.append(j * 2 + axis)
    return np.concatenate(lower).astype(np.int32), np.concatenate(upper).astype(np.int32)


def build_shape_model(landmarks: np.ndarray, image_size: int, num_components: int = 12, alignment_iterations: int = 3) -> ShapeModel:
    """Learn the shape model from training landmarks.

    Args:
      landmarks: f[N, L, 2] (x, y) in pixels of image_size^2 crops; shapes with
        non-finite coordinates (unlabelled points) are left out.
      num_components: principal components kept (the authors use 12).
      alignment_iterations: rounds of aligning every shape to the current mean
        and recomputing the mean (generalised Procrustes, rotation only).
    """
    if image_size < 1:
        raise ValueError(f"image_size is the crop side in pixels, got {image_size}")
    shapes = np.asarray(landmarks, np.float64)
    if shapes.ndim != 3 or shapes.shape[-1] != 2:
        raise ValueError(f"landmarks must have shape [N, L, 2], got {shapes.shape}")
    shapes = shapes[np.all(np.isfinite(shapes), axis=(1, 2))]
    n, num_l, _ = shapes.shape
    if n < num_components + 1:
        raise ValueError(f"{n} complete training shapes cannot give {num_components} principal components; need at least {num_components + 1}")
    center = np.full(2, (image_size - 1) / 2.0)
    aligned, reference = shapes, shapes.mean(0)
    for _ in range(alignment_iterations):
        theta = kabsch_angle(shapes, np.broadcast_to(reference, shapes.shape), xp=np)
        aligned = rotate(shapes, theta, center, xp=np)
        reference = aligned.mean(0)
    mean = aligned.mean(0)
    _, s, vt = np.linalg.svd((aligned - mean).reshape(n, -1), full_matrices=False)
    stddev = s[:num_components] / np.sqrt(n - 1)
    components = vt[:num_components].reshape(num_components, num_l, 2) * stddev[:, None, None]
    lower, upper = _order_constraints(aligned)
    return ShapeModel(
        mean=jnp.asarray(mean, jnp.float32),
        components=jnp.asarray(components, jnp.float32),
        lower=jnp.asarray(lower),
        upper=jnp.asarray(upper),
        image_size=int(image_size),
    )


def save_shape_model(directory: str, model: ShapeModel) -> str:
    """Write ``directory/shape_model.npz`` atomically; returns its path."""
    path = os.path.join(directory, FILENAME)
    with atomic_path(path, ".npz") as tmp:
        np.savez(tmp, mean=np.asarray(model.mean), components=np.asarray(model.components), lower=np.asarray(model.lower),
                 upper=np.asarray(model.upper), image_size=np.int64(model.image_size))
    return path


def load_shape_model(directory: str) -> ShapeModel:
    """Read ``directory/shape_model.npz`` (written by training or ``save_shape_model``)."""
    path = os.path.join(directory, FILENAME)
    if not os.path.exists(path):
        raise ShapeModelError(
            f"{path} does not exist: this checkpoint has no shape model. Build it from the training split with "
            f"`python run_train.py --workdir {directory} --shape_model_only`, or evaluate without it (run_eval.py --no_shape_model)."
        )
    try:
        with np.load(path) as z:
            model = ShapeModel(
                mean=jnp.asarray(z["mean"], jnp.float32),
                components=jnp.asarray(z["components"], jnp.float32),
                lower=jnp.asarray(z["lower"], jnp.int32),
                upper=jnp.asarray(z["upper"], jnp.int32),
                image_size=int(z["image_size"]),
            )
    except Exception as e:  # zip, pickle and key errors alike
        raise ShapeModelError(f"{path} is corrupt ({type(e).__name__}: {e}); delete it and rebuild with `python run_train.py --workdir {directory} --shape_model_only`") from e
    if model.mean.ndim != 2 or model.components.shape[1:] != model.mean.shape:
        raise ShapeModelError(f"{path} holds arrays of inconsistent shapes (mean {model.mean.shape}, components {model.components.shape}); rebuild it")
    return model
