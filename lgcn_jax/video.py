"""Videos in and out: frames read with OpenCV, landmarks as JSON lines, an annotated copy.

    python -m lgcn_jax.detect clip.mp4 --out results/    # results/clip.jsonl, results/clip_landmarks.mp4

Frames are decoded one at a time (memory does not grow with the length), tracked with
``lgcn_jax.track``, and written as they come: a fault in the middle of a file keeps
every frame read before it.
"""

from __future__ import annotations

import json
import os
from typing import Iterator

import numpy as np

from lgcn_jax.track import MIN_CONFIDENCE

__all__ = ["VIDEO_EXTENSIONS", "VideoError", "is_video", "read_frames", "annotate_video"]

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".m4v", ".webm")


class VideoError(RuntimeError):
    """A video that cannot be opened or ends early; the message names the file."""


def is_video(path: str) -> bool:
    return os.path.splitext(str(path))[1].lower() in VIDEO_EXTENSIONS


def _cv2():
    import cv2

    return cv2


def video_info(path: str) -> dict:
    """fps, frame count (as the container states it; 0 if unknown), width and height of a video."""
    cv2 = _cv2()
    cap = _open(path)
    try:
        return {"fps": float(cap.get(cv2.CAP_PROP_FPS) or 0.0), "frames": max(int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0), 0),
                "width": int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), "height": int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))}
    finally:
        cap.release()


def _open(path: str):
    cv2 = _cv2()
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
    cv2 = _cv2()
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


def annotate_video(path: str, out_dir: str, model, name: str | None = None, *, detector=None, detect_every: int = 10,
                   min_confidence: float = MIN_CONFIDENCE, progress: bool = True, first_pass=None) -> dict:
    """Track the faces of video ``path``; write ``NAME.jsonl`` (one line per frame) and ``NAME_landmarks.mp4``.

    Each JSON line: ``{"frame": i, "time_s": t, "faces": [Face.to_dict(), ...]}``.  Returns a
    summary (frames, faces per frame, seconds, fps of the processing).  A ``VideoError``
    from a truncated file is raised after the frames before it are written.
    """
    import time

    from tqdm.auto import tqdm

    from lgcn_jax.detect import draw
    from lgcn_jax.track import Tracker

    cv2 = _cv2()
    info = video_info(path)
    name = name or os.path.splitext(os.path.basename(path))[0]
    os.makedirs(out_dir, exist_ok=True)
    jsonl, mp4 = os.path.join(out_dir, name + ".jsonl"), os.path.join(out_dir, name + "_landmarks.mp4")
    fps = info["fps"] if info["fps"] > 0 else 25.0
    tracker = Tracker(model, detector=detector, detect_every=detect_every, min_confidence=min_confidence, first_pass=first_pass)
    writer = None
    frames = counted = 0
    start = time.perf_counter()
    bar = tqdm(total=info["frames"] or None, disable=not progress, unit="frame", desc=os.path.basename(path))
    try:
        with open(jsonl, "w") as out:
            for frame in read_frames(path):
                faces = tracker.update(frame)
                out.write(json.dumps({"frame": frames, "time_s": round(frames / fps, 4), "faces": [f.to_dict() for f in faces]}) + "\n")
                out.flush()
                if writer is None:
                    h, w = frame.shape[:2]
                    writer = cv2.VideoWriter(mp4, cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
                writer.write(cv2.cvtColor(np.asarray(draw(frame, faces)), cv2.COLOR_RGB2BGR))
                frames += 1
                counted += len(faces)
                bar.update(1)
    finally:
        bar.close()
        if writer is not None:
            writer.release()
    seconds = time.perf_counter() - start
    return {"video": path, "frames": frames, "faces": counted, "seconds": seconds, "fps": frames / max(seconds, 1e-9),
            "jsonl": jsonl, "annotated": mp4}
