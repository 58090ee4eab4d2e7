"""Reading images of any mode into the network's 8-bit grayscale, with clear errors.

Modes: 1, L, P, RGB, RGBA, LA, CMYK, YCbCr, I;16*, I and F.  Alpha is composited
over black.  16-bit images (uint16 arrays, I;16 modes) are scaled from 0..65535; other
integer images (int32 arrays, mode I, which PIL makes of them) from 0..255 if their maximum
is at most 255, else from 0..65535.  Float images are taken as 0..1 (above 1 clipped: a
resize overshoot) if their maximum is at most 2, else as 0..255.  Any byte order.
"""

from __future__ import annotations

import os
import re

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from lgcn_jax.errors import ImageError

__all__ = ["ImageError", "IMAGE_EXTENSIONS", "is_image", "to_gray", "open_image", "exif_orientation", "load_gray"]

EXIF_ORIENTATION = 0x0112
# The endings taken as images when a folder is searched (lgcn-extract): formats Pillow reads.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".jp2")


def is_image(path: str) -> bool:
    return os.path.splitext(str(path))[1].lower() in IMAGE_EXTENSIONS


def exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation tag (1 = as stored) of a PIL image; 1 if absent."""
    try:
        return int(image.getexif().get(EXIF_ORIENTATION, 1) or 1)
    except Exception:  # broken EXIF blocks are common; treat as absent
        return 1


def to_gray(image) -> np.ndarray:
    """u8[H, W] grayscale from a PIL image or an array (u8/u16/float, [H, W], [H, W, 1|3|4])."""
    if isinstance(image, Image.Image):
        return _pil_to_gray(image)
    if isinstance(image, (list, tuple)) and (not image or isinstance(image[0], (str, os.PathLike, Image.Image))):
        raise ImageError(f"got a {type(image).__name__} of {len(image)} images where one image is due; "
                         "detect_batch (and track, for video frames) take several")
    a = np.asarray(image)
    if not a.dtype.isnative:  # big-endian data (e.g. from FITS or some TIFF readers)
        a = a.astype(a.dtype.newbyteorder("="))
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)):
        raise ImageError(f"an image array must be [H, W], [H, W, 1], [H, W, 3] or [H, W, 4], got shape {a.shape}")
    if a.size == 0:
        raise ImageError(f"the image array is empty (shape {a.shape})")
    if a.dtype == np.uint8:
        f = a.astype(np.float32)
    elif a.dtype == np.uint16:
        f = a.astype(np.float32) / 257.0
    elif np.issubdtype(a.dtype, np.floating):
        if not np.all(np.isfinite(a)):
            raise ImageError("the image array holds NaN or infinite values")
        f = a.astype(np.float32) * (255.0 if a.max() <= 2.0 else 1.0)
    elif a.dtype == np.bool_:
        f = a.astype(np.float32) * 255.0
    elif np.issubdtype(a.dtype, np.integer):
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi > 65535:
            raise ImageError(f"an integer image must hold 0..255 or 0..65535, got values from {lo} to {hi}")
        f = a.astype(np.float32) / (1.0 if hi <= 255 else 257.0)
    else:
        raise ImageError(f"unsupported image dtype {a.dtype}; use uint8, uint16 or float")
    if f.ndim == 3:
        if f.shape[-1] == 4:
            f = f[..., :3] * (f[..., 3:] / 255.0)  # over black
        f = f[..., 0] * 0.299 + f[..., 1] * 0.587 + f[..., 2] * 0.114  # ITU-R 601 luma, as PIL's "L"
    return np.clip(np.round(f), 0, 255).astype(np.uint8)


def _pil_to_gray(im: Image.Image) -> np.ndarray:
    mode = im.mode
    if mode == "L":
        return np.asarray(im, np.uint8).copy()
    if mode.startswith("I;16"):  # declared 16-bit: to_gray's uint16 path, whatever its values
        return to_gray(np.asarray(im.convert("I")).astype(np.uint16))
    if mode == "I":  # 32-bit integers: PIL's mode for int32 arrays, and for some 16-bit files
        return to_gray(np.asarray(im, np.int64))
    if mode == "F":
        return to_gray(np.asarray(im, np.float32))
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info):
        rgba = np.asarray(im.convert("RGBA"))
        return to_gray(rgba)
    return np.asarray(im.convert("RGB").convert("L"), np.uint8).copy()


def open_image(path: str) -> Image.Image:
    """Open and fully decode an image file, or raise ImageError naming it."""
    if not os.path.exists(path):
        raise ImageError(f"{path}: no such file")
    if os.path.isdir(path):
        raise ImageError(f"{path} is a folder, not an image")
    try:
        im = Image.open(path)
        im.load()
    except Image.DecompressionBombError as e:  # not an OSError: it would escape and stop a whole batch
        raise ImageError(f"{path}: {_bomb_message(e)}") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{path}: cannot read the image ({type(e).__name__}: {e}); the file is corrupt or not an image") from e
    return im


def _bomb_message(e: Exception) -> str:
    # Pillow refuses before decoding and says only the pixel count: "Image size (N pixels) exceeds limit of M pixels ...".
    m = re.search(r"\((\d+) pixels\) exceeds limit of (\d+) pixels", str(e))
    if not m:
        return f"Pillow refuses to decode it ({e})"
    claimed, limit = int(m.group(1)), int(m.group(2))
    return (f"its header claims {claimed:,} pixels ({claimed / 1e6:,.0f} megapixels), over the limit of {limit:,} that Pillow "
            "decodes (twice PIL.Image.MAX_IMAGE_PIXELS): a corrupt file or a decompression bomb; raise PIL.Image.MAX_IMAGE_PIXELS "
            "to read a real image so large")


def load_gray(path_or_image, exif: str = "apply") -> np.ndarray:
    """u8[H, W] grayscale of a file, PIL image or array.

    exif: "apply" rotates by the EXIF orientation as viewers show it; "stored"
    keeps the stored pixel order; "error" refuses images whose orientation is
    not 1 (for annotations whose frame would then be ambiguous).
    """
    if isinstance(path_or_image, (str, os.PathLike)):
        im = open_image(str(path_or_image))
        name = str(path_or_image)
    elif isinstance(path_or_image, Image.Image):
        im, name = path_or_image, "the image"
    else:
        return to_gray(path_or_image)
    orientation = exif_orientation(im)
    if orientation != 1:
        if exif == "error":
            raise ImageError(
                f"{name} has EXIF orientation {orientation}: its annotation may refer to the stored or the rotated pixels. "
                "Strip the tag after checking (e.g. `exiftool -Orientation= FILE`), or choose --exif stored (annotations on the stored pixels) / --exif apply (on the rotated image)"
            )
        if exif == "apply":
            im = ImageOps.exif_transpose(im)
        elif exif != "stored":
            raise ValueError(f"exif must be 'apply', 'stored' or 'error', got {exif!r}")
    return to_gray(im)
