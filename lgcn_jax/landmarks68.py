"""The 68-point iBUG markup of 300-W, in one place (0-based indices; the .pts files count from 1).

The subject's right eye, points 36-41, is on the image's left.
"""

from __future__ import annotations

import numpy as np

__all__ = ["NUM_POINTS", "RIGHT_EYE", "LEFT_EYE", "OUTER_EYE_CORNERS", "MOUTH_CORNERS", "FLIP_PERMUTATION", "mirror_heatmaps"]

NUM_POINTS = 68
RIGHT_EYE, LEFT_EYE = slice(36, 42), slice(42, 48)
OUTER_EYE_CORNERS = (36, 45)  # 300-W's inter-ocular normaliser
MOUTH_CORNERS = (48, 54)  # the outer lip's

# The point each point becomes in the mirrored face.
FLIP_PERMUTATION = np.array(
    list(range(16, -1, -1))  # jaw
    + list(range(26, 16, -1))  # brows
    + [27, 28, 29, 30]  # bridge
    + [35, 34, 33, 32, 31]  # nostrils
    + [45, 44, 43, 42, 47, 46]  # left eye <- right eye
    + [39, 38, 37, 36, 41, 40]
    + [54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55]  # outer lip
    + [64, 63, 62, 61, 60, 67, 66, 65]  # inner lip
)


def mirror_heatmaps(heatmaps):
    """The heatmaps of the mirror image, as maps of the original's points: f32[..., H, W, 68] -> same.

    Columns are reversed (x -> W - 1 - x, the mirror of the augmentation) and the maps reordered by
    ``FLIP_PERMUTATION`` (its own inverse), so the map of the mirror image's left eye corner becomes that
    of the right one.  NumPy or JAX arrays.
    """
    if heatmaps.shape[-1] != NUM_POINTS:
        raise ValueError(f"mirroring heatmaps needs the 68-point markup, got {heatmaps.shape[-1]} maps")
    return heatmaps[..., ::-1, :][..., FLIP_PERMUTATION]
