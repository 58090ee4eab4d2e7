"""Procedural 68-point faces: a built-in dataset that needs no download.

Each face is a hand-built mean shape in the iBUG 68-point order with rough
depths, deformed by identity and expression modes, rotated in 3D (yaw,
pitch, roll), scaled, translated, then drawn with PIL: shaded skin, eyes with
irises, brows, nose, lips and an open mouth, on a textured background, with
random occluders, blur and noise.  Everything is a pure function of a seed.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

__all__ = ["MEAN_SHAPE", "sample_shape", "make_face", "make_split", "draw_face", "SUPERSAMPLE"]

SUPERSAMPLE = 2

# (x, y, z): x right, y down, z towards the camera; jaw spans x in [-0.95, 0.95].
def _mean_shape() -> np.ndarray:
    pts = []
    for i in range(17):  # jaw 0-16, image left to image right through the chin
        phi = np.pi * i / 16
        x = -0.95 * np.cos(phi)
        y = -0.12 + 1.08 * np.sin(phi) ** 0.8
        pts.append((x, y, 0.55 * np.sin(phi) - 0.45))
    for side in (-1, 1):  # brows 17-21 (left in image), 22-26
        ts = np.linspace(0, 1, 5)
        xs = -0.8 + 0.6 * ts if side < 0 else 0.2 + 0.6 * ts
        for t, x in zip(ts, xs):
            arch = np.sin(np.pi * (t if side < 0 else 1 - t) * 0.9 + 0.15)
            pts.append((x, -0.48 - 0.12 * arch, 0.12))
    for t in np.linspace(0, 1, 4):  # nose bridge 27-30
        pts.append((0.0, -0.33 + 0.48 * t, 0.15 + 0.3 * t))
    for x in np.linspace(-0.18, 0.18, 5):  # nostrils 31-35
        pts.append((x, 0.27 + 0.03 * (1 - abs(x) / 0.18), 0.3 - 0.3 * abs(x)))
    eye = [(-0.2, 0.0), (-0.08, -0.07), (0.07, -0.07), (0.19, 0.0), (0.07, 0.06), (-0.08, 0.06)]
    for cx in (-0.43, 0.43):  # eyes 36-41 (outer corner first), 42-47 (inner corner first)
        for ex, ey in eye:
            pts.append((cx + ex, -0.25 + ey, 0.05))
    outer = [(-0.38, 0.58), (-0.25, 0.52), (-0.1, 0.49), (0.0, 0.51), (0.1, 0.49), (0.25, 0.52),
             (0.38, 0.58), (0.25, 0.68), (0.1, 0.72), (0.0, 0.73), (-0.1, 0.72), (-0.25, 0.68)]
    inner = [(-0.3, 0.58), (-0.1, 0.56), (0.0, 0.565), (0.1, 0.56), (0.3, 0.58), (0.1, 0.6), (0.0, 0.605), (-0.1, 0.6)]
    for x, y in outer + inner:  # mouth 48-59, 60-67
        pts.append((x, y, 0.18 - 0.3 * x * x))
    return np.asarray(pts, np.float64)


MEAN_SHAPE = _mean_shape()  # f64[68, 3]
_LOWER_LIP = np.array([55, 56, 57, 58, 59, 65, 66, 67])
_CORNERS = np.array([48, 54, 60, 64])
_BROWS = np.arange(17, 27)
_LOWER_JAW = np.arange(4, 13)


def sample_shape(rng: np.random.Generator) -> np.ndarray:
    """A random 3D face shape f64[68, 3] (identity and expression), not yet posed."""
    s = MEAN_SHAPE.copy()
    s[:, 0] *= rng.uniform(0.85, 1.15)  # face width
    s[:, 1] *= rng.uniform(0.9, 1.12)  # face height
    eye_gap = rng.uniform(-0.05, 0.05)
    s[36:42, 0] -= eye_gap
    s[42:48, 0] += eye_gap
    s[_BROWS, 1] -= rng.uniform(-0.04, 0.12)  # brow raise
    opening = rng.uniform(0.0, 0.25) if rng.random() < 0.5 else 0.0
    s[_LOWER_LIP, 1] += opening
    s[[65, 66, 67], 1] += 0.2 * opening
    s[_LOWER_JAW, 1] += 0.5 * opening * np.sin(np.linspace(0.3, np.pi - 0.3, len(_LOWER_JAW)))
    smile = rng.uniform(-0.03, 0.07)
    s[_CORNERS, 1] -= smile
    s[_CORNERS, 0] *= 1 + smile
    s[:, :2] += rng.normal(0, 0.012, size=(68, 2))
    return s


def _rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    cy, sy, cp, sp, cr, sr = np.cos(yaw), np.sin(yaw), np.cos(pitch), np.sin(pitch), np.cos(roll), np.sin(roll)
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rx = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    rz = np.array([[cr, -sr, 0], [sr, cr, 0], [0, 0, 1]])
    return rz @ rx @ ry


def pose_shape(shape3d: np.ndarray, yaw: float, pitch: float, roll: float, scale: float, center: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Project a posed shape: returns 2D points f64[68, 2] and rotated depths f64[68]."""
    r = _rotation(yaw, pitch, roll)
    p = shape3d @ r.T
    return p[:, :2] * scale + np.asarray(center), p[:, 2]


def _texture(rng: np.random.Generator, size: int) -> Image.Image:
    coarse = rng.uniform(0, 255, size=(rng.integers(3, 9), rng.integers(3, 9))).astype(np.uint8)
    img = Image.fromarray(coarse, "L").resize((size, size), Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(rng.integers(0, 12)):
        x0, y0, x1, y1 = rng.uniform(-0.2, 1.2, 4) * size
        fill = int(rng.integers(0, 256))
        if rng.random() < 0.5:
            draw.line([(x0, y0), (x1, y1)], fill=fill, width=int(rng.integers(1, 6)))
        else:
            draw.rectangle([min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)], fill=fill)
    return img


def draw_face(canvas: Image.Image, pts: np.ndarray, depth: np.ndarray, rng: np.random.Generator, scale: float) -> None:
    """Draw a face on ``canvas`` (mode L) at supersampled coordinates ``pts`` f64[68, 2]."""
    draw = ImageDraw.Draw(canvas)
    P = [tuple(p) for p in pts]
    skin = int(rng.integers(90, 220))
    # Face region: the jaw closed by a forehead arc above the brows.
    jaw = pts[0:17]
    top_mid = (pts[19] + pts[24]) / 2
    up = top_mid - pts[8]
    up = up / (np.linalg.norm(up) + 1e-9)
    forehead = [pts[16] + up * scale * 0.35 * t for t in (0.6,)] + [
        top_mid + up * scale * 0.3 + (pts[26] - pts[17]) * f for f in (0.45, 0.15, -0.15, -0.45)
    ] + [pts[0] + up * scale * 0.35 * 0.6]
    outline = [tuple(p) for p in np.concatenate([jaw, np.asarray(forehead)])]
    draw.polygon(outline, fill=skin)
    # Shading: a linear light ramp multiplied in, restricted to the face mask.
    size = canvas.size[0]
    mask = Image.new("L", canvas.size, 0)
    ImageDraw.Draw(mask).polygon(outline, fill=255)
    ang = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:size, 0:size]
    ramp = 1.0 + rng.uniform(0.1, 0.45) * (np.cos(ang) * (xx - pts[30, 0]) + np.sin(ang) * (yy - pts[30, 1])) / (1.2 * scale)
    arr = np.asarray(canvas, np.float64)
    m = np.asarray(mask, np.float64) / 255.0
    arr = arr * (1 - m) + np.clip(arr * ramp, 0, 255) * m
    canvas.paste(Image.fromarray(arr.astype(np.uint8), "L"))
    draw = ImageDraw.Draw(canvas)
    dark = max(0, skin - int(rng.integers(40, 90)))
    width = max(1, int(scale * 0.035))
    draw.line(P[0:17], fill=max(0, skin - 35), width=width)  # jaw edge
    for lo, hi in ((17, 22), (22, 27)):  # brows
        draw.line(P[lo:hi], fill=dark, width=max(2, int(scale * 0.07)), joint="curve")
    draw.line(P[27:31], fill=max(0, skin - 30), width=width)  # bridge
    draw.line(P[31:36], fill=max(0, skin - 45), width=width)
    for i in (31, 35):
        r = scale * 0.04
        draw.ellipse([pts[i, 0] - r, pts[i, 1] - r, pts[i, 0] + r, pts[i, 1] + r], fill=max(0, skin - 70))
    white = int(min(255, skin + rng.integers(10, 60)))
    iris = int(rng.integers(10, 90))
    for lo in (36, 42):  # eyes
        eye = P[lo : lo + 6]
        draw.polygon(eye, fill=white)
        c = pts[lo : lo + 6].mean(0) + rng.normal(0, 0.02, 2) * scale
        r = 0.5 * np.linalg.norm(pts[lo + 1] - pts[lo + 5]) * 1.05
        draw.ellipse([c[0] - r, c[1] - r, c[0] + r, c[1] + r], fill=iris)
        draw.line(eye + [eye[0]], fill=max(0, skin - 80), width=width)
    lip = int(np.clip(skin - rng.integers(20, 70), 0, 255))
    draw.polygon(P[48:60], fill=lip)
    inner = P[60:68]
    gap = np.linalg.norm(pts[66] - pts[62])
    draw.polygon(inner, fill=int(rng.integers(0, 40)) if gap > 0.03 * scale else lip)
    draw.line(P[48:60] + [P[48]], fill=max(0, lip - 30), width=width)


def make_face(seed: int, image_size: int = 96) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic face crop.

    Returns:
      image u8[image_size, image_size] and landmarks f32[68, 2] (x, y), 0-indexed
      pixel coordinates in that image (pixel centres at integers).
    """
    rng = np.random.default_rng(seed)
    ss = SUPERSAMPLE
    size = image_size * ss
    canvas = _texture(rng, size)
    shape = sample_shape(rng)
    # Face scale so that the jaw spans ~45-70% of the crop, like a loose 300-W crop.
    scale = rng.uniform(0.22, 0.34) * size
    center = size / 2 + rng.uniform(-0.06, 0.06, 2) * size
    center[1] -= 0.15 * scale
    yaw, pitch, roll = np.deg2rad(rng.uniform(-35, 35)), np.deg2rad(rng.uniform(-15, 15)), np.deg2rad(rng.uniform(-25, 25))
    pts, depth = pose_shape(shape, yaw, pitch, roll, scale, tuple(center))
    draw_face(canvas, pts, depth, rng, scale)
    _occlude(canvas, rng, pts, scale)
    img = canvas.resize((image_size, image_size), Image.BOX)
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2)))
    arr = np.asarray(img, np.float64) + rng.normal(0, rng.uniform(0, 8), (image_size, image_size))
    image = np.clip(arr, 0, 255).astype(np.uint8)
    # Supersampled coordinate u maps to output pixel centre (u - ss/2) / ss.
    landmarks = ((pts - ss / 2) / ss).astype(np.float32)
    return image, landmarks


def _occlude(canvas: Image.Image, rng: np.random.Generator, pts: np.ndarray, scale: float) -> None:
    if rng.random() >= 0.3:
        return
    draw = ImageDraw.Draw(canvas)
    c = pts[rng.integers(0, 68)]
    w, h = rng.uniform(0.2, 0.6, 2) * scale
    box = [c[0] - w, c[1] - h, c[0] + w, c[1] + h]
    fill = int(rng.integers(0, 256))
    (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)


def make_split(name: str, count: int, image_size: int = 96, base_seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``count`` faces of a named split: u8[N, S, S] images and f32[N, 68, 2] landmarks."""
    offset = {"train": 0, "validation": 10_000_000, "test": 20_000_000}[name]
    images = np.empty((count, image_size, image_size), np.uint8)
    landmarks = np.empty((count, 68, 2), np.float32)
    for i in range(count):
        images[i], landmarks[i] = make_face(base_seed + offset + i, image_size)
    return images, landmarks

