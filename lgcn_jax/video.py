"""Reading videos with OpenCV: frames decoded one at a time (memory does not grow with the length),
and a clear error naming the file when it cannot be opened or ends early."""

from __future__ import annotations

import os
from typing import Iterator

import cv2
import numpy as np

from lgcn_jax.errors import VideoError

__all__ = ["VIDEO_EXTENSIONS", "VideoError", "is_video", "video_info", "read_frames"]

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".m4v", ".webm")


def is_video(path: str) -> bool:
    return os.path.splitext(str(path))[1].lower() in VIDEO_EXTENSIONS


def video_info(path: str) -> dict:
    """fps, frame count (as the container states it; 0 if unknown), width and height of a video."""
    cap = _open(path)
    try:
        return {"fps": float(cap.get(cv2.CAP_PROP_FPS) or 0.0), "frames": max(int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0), 0),
                "width": int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), "height": int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))}
    finally:
        cap.release()


def _open(path: str):
    if not os.path.isfile(path):
        raise VideoError(f"{path}: no such file")
    cap = cv2.VideoCapture(path)
    if not cap.isOpened():
        cap.release()
        raise VideoError(f"{path}: OpenCV cannot open it as a video (not a video, truncated, or a codec this OpenCV build lacks); "
                         "convert it with e.g. `ffmpeg -i IN -c:v libx264 OUT.mp4`")
    return cap


def read_frames(path: str) -> Iterator[np.ndarray]:
    """RGB u8[H, W, 3] frames of a video, in order.

    Raises ``VideoError`` naming the file if it cannot be opened, has no frame, or ends
    before the frame count its container states (a truncated or corrupt file) — after
    yielding every frame that could be read.
    """
    cap = _open(path)
    stated = max(int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0), 0)
    read = 0
    try:
        while True:
            try:
                ok, frame = cap.read()
            except cv2.error as e:  # pragma: no cover - decoders mostly report by returning False
                raise VideoError(f"{path}: decoding failed after {read} frames ({e})") from e
            if not ok:
                break
            read += 1
            yield cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
    finally:
        cap.release()
    if read == 0:
        raise VideoError(f"{path}: no frame could be decoded (empty, truncated or corrupt)")
    if stated and read < stated:
        raise VideoError(f"{path}: ended after {read} of the {stated} frames its header states (truncated or corrupt); "
                         f"the {read} frames read are in the output")
