"""Results written to files: an image's faces as JSON and an annotated PNG; a video's as JSON lines and an
annotated mp4 (what ``lgcn-detect`` writes)."""

from __future__ import annotations

import json
import os
import time

import cv2
import numpy as np
from tqdm.auto import tqdm

from lgcn_jax.detect import Face, detect
from lgcn_jax.draw import draw
from lgcn_jax.files import atomic_path
from lgcn_jax.image_io import open_image
from lgcn_jax.predict import Model
from lgcn_jax.track import MIN_CONFIDENCE, Tracker
from lgcn_jax.video import is_video, read_frames, video_info

__all__ = ["annotate_image", "annotate_video", "result_name"]


def result_name(out_dir: str, name: str, path: str) -> str:
    """The results file of input ``path`` saved under ``name`` (``NAME.jsonl`` for a video, ``NAME.json`` else)."""
    return os.path.join(out_dir, name + (".jsonl" if is_video(path) else ".json"))


def annotate_image(path: str, out_dir: str, model: Model, name: str | None = None, **detect_args) -> list[Face]:
    """Detect the faces of image ``path``; write ``NAME.json`` (the model, the image and its faces) and
    ``NAME_landmarks.png``.  ``detect_args`` go to ``detect``.  An unreadable file raises ``ImageError``."""
    name = name or os.path.splitext(os.path.basename(path))[0]
    image = open_image(path)  # decoded once for detection and drawing
    faces = detect(image, model, **detect_args)
    with atomic_path(os.path.join(out_dir, name + ".json")) as tmp, open(tmp, "w") as f:
        json.dump({"image": os.path.abspath(path), "model": model.name, "faces": [face.to_dict() for face in faces]}, f, indent=1)
    draw(image, faces).save(os.path.join(out_dir, name + "_landmarks.png"))
    return faces


def annotate_video(path: str, out_dir: str, model: Model, name: str | None = None, *, detector=None, detect_every: int = 10,
                   min_confidence: float = MIN_CONFIDENCE, progress: bool = True, first_pass=None, refine: int | None = None) -> dict:
    """Track the faces of video ``path``; write ``NAME.jsonl`` (one line per frame) and ``NAME_landmarks.mp4``.

    Each JSON line: ``{"frame": i, "time_s": t, "model": name, "faces": [Face.to_dict(), ...]}``.  Returns a
    summary (frames, faces per frame, seconds, fps of the processing).  A ``VideoError`` from a truncated
    file is raised after the frames before it are written.
    """
    info = video_info(path)
    name = name or os.path.splitext(os.path.basename(path))[0]
    os.makedirs(out_dir, exist_ok=True)
    jsonl, mp4 = os.path.join(out_dir, name + ".jsonl"), os.path.join(out_dir, name + "_landmarks.mp4")
    fps = info["fps"] if info["fps"] > 0 else 25.0
    tracker = Tracker(model, detector=detector, detect_every=detect_every, min_confidence=min_confidence, first_pass=first_pass,
                      refine=refine)
    writer = None
    frames = counted = 0
    start = time.perf_counter()
    bar = tqdm(total=info["frames"] or None, disable=not progress, unit="frame", desc=os.path.basename(path))
    try:
        with open(jsonl, "w") as out:
            for frame in read_frames(path):
                faces = tracker.update(frame)
                out.write(json.dumps({"frame": frames, "time_s": round(frames / fps, 4), "model": model.name,
                                      "faces": [f.to_dict() for f in faces]}) + "\n")
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
            "jsonl": jsonl, "annotated": mp4, "model": model.name}
