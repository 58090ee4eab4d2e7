"""Frames per second of landmarks on video: track() against detect() on every frame.

    python bench/bench_video.py [--frames 120] [--size 640x480] [--checkpoint 300w_cpu]

The clip: the Grace Hopper photo (bundled with matplotlib) moving across the frame and rolling
by up to 20 degrees.  Measures, with the released default weights and detector: ``track`` (detector
every 10 frames, two passes per face in between), ``detect`` on every frame, and ``lgcn-detect``'s
video path (``video.annotate_video``: decoding, tracking, JSON lines and the annotated mp4).
Writes bench/results_video.json.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from common import machine, write_results

import cv2
import matplotlib
import numpy as np
from PIL import Image

import lgcn_jax
from lgcn_jax.annotate import annotate_video
from lgcn_jax.release import resolve_model

PHOTO = os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "sample_data", "grace_hopper.jpg")


def clip(n: int, width: int, height: int) -> list[np.ndarray]:
    photo = np.asarray(Image.open(PHOTO).convert("RGB"))
    scale = 0.6 * height / photo.shape[0]
    frames = []
    for i in range(n):
        t = i / max(n - 1, 1)
        theta = np.radians(20.0 * np.sin(2 * np.pi * t))
        r = scale * np.array([[np.cos(theta), np.sin(theta)], [-np.sin(theta), np.cos(theta)]])
        centre = np.array([width * (0.3 + 0.4 * t), height * 0.5])
        m = np.hstack([r, (centre - r @ np.array([photo.shape[1] / 2, photo.shape[0] / 2]))[:, None]])
        frames.append(cv2.warpAffine(photo, m, (width, height), flags=cv2.INTER_LINEAR, borderValue=(90, 90, 90)))
    return frames


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=120)
    p.add_argument("--size", default="640x480")
    p.add_argument("--checkpoint", help="released weights by name (e.g. 300w_cpu) or a checkpoint folder; default: this machine's "
                                        "(lgcn_jax.release.default_weights)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results_video.json"))
    args = p.parse_args(argv)
    width, height = (int(v) for v in args.size.split("x"))
    frames = clip(args.frames, width, height)
    model = resolve_model(args.checkpoint)
    weights = model.name
    list(lgcn_jax.track(frames[:12], model))  # compile every shape once
    lgcn_jax.detect(frames[0], model)
    t = time.perf_counter()
    tracked = list(lgcn_jax.track(frames, model))
    t_track = time.perf_counter() - t
    t = time.perf_counter()
    per_frame = [lgcn_jax.detect(f, model) for f in frames]
    t_detect = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "clip.avi")
        writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"MJPG"), 25, (width, height))
        for f in frames:
            writer.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
        writer.release()
        summary = annotate_video(path, os.path.join(tmp, "out"), model, progress=False)
    result = {"machine": machine(), "weights": weights, "frames": args.frames, "size": args.size,
              "track_fps": args.frames / t_track, "detect_every_frame_fps": args.frames / t_detect,
              "lgcn_detect_video_fps": summary["fps"],
              "frames_with_a_face": {"track": sum(len(f) == 1 for f in tracked), "detect": sum(len(f) == 1 for f in per_frame)}}
    print(f"{weights}, {args.size}, {args.frames} frames: track {result['track_fps']:.1f} fps, detect on every frame {result['detect_every_frame_fps']:.1f} fps, "
          f"lgcn-detect video (decode + track + JSON + annotated mp4) {result['lgcn_detect_video_fps']:.1f} fps; "
          f"frames with the face: track {result['frames_with_a_face']['track']}, detect {result['frames_with_a_face']['detect']}")
    return write_results(result, args.out)


if __name__ == "__main__":
    main()
