"""Drawing landmarks: every face's box and points on an RGB copy of the image."""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from lgcn_jax.image_io import load_gray, open_image

__all__ = ["draw", "to_rgb"]


def to_rgb(image) -> Image.Image:
    """An RGB PIL image of a path, PIL image or array (EXIF orientation applied; other modes through gray)."""
    if isinstance(image, (str, os.PathLike)):
        image = open_image(str(image))
    if isinstance(image, Image.Image):
        image = ImageOps.exif_transpose(image)
        if image.mode in ("RGB", "RGBA", "P", "CMYK", "YCbCr", "L", "LA", "1"):
            return image.convert("RGB")
        return Image.fromarray(load_gray(image, exif="stored")).convert("RGB")
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[-1] in (3, 4) and a.dtype == np.uint8:
        return Image.fromarray(np.ascontiguousarray(a[..., :3]))
    return Image.fromarray(load_gray(a)).convert("RGB")


def draw(image, faces: Sequence, radius: float | None = None) -> Image.Image:
    """An RGB PIL image with every face's box and landmarks (green = confident, red = placed by the model).

    ``faces``: anything with ``box`` f[4], ``landmarks`` f[L, 2] and ``confidence`` f[L] in image pixels (``Face``).
    """
    im = to_rgb(image)
    d = ImageDraw.Draw(im)
    for f in faces:
        r = radius or max(1.5, float(f.box[2] - f.box[0]) / 60)
        d.rectangle([float(v) for v in f.box], outline=(255, 200, 0), width=max(1, int(r / 1.5)))
        for (x, y), c in zip(f.landmarks, f.confidence):
            c = float(np.clip(c, 0, 1))
            d.ellipse([x - r, y - r, x + r, y + r], fill=(int(255 * (1 - c)), int(255 * c), 60))
    return im
