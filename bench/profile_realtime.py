"""Landmarks in real time on a CPU: every stage of ``detect`` on a photo, against dlib in the same run.

    python bench/profile_realtime.py [--data ../shared/data/300w_partial] [--peers] [--photos 20]

Two sets of photos, written as JPEG files first so that decoding is part of every timing:
  * 640x480: LFPW test photos (faces of 82-160 px) centred on a grey 640x480 canvas;
  * small frames: HELEN test photos scaled so that their faces span 80-150 px, centred on a grey 400x300 canvas.
(Without --data's 300-W folder, copies of the Grace Hopper photo bundled with matplotlib stand in.)
For each photo, the best of --repeats runs; the table gives the median over the photos:
  * ``detect(path)`` with this machine's defaults (``lgcn_jax.machine``: weights, detector, passes) end to end,
    and the same with any --variant (e.g. ``refine=1``, ``detector=yunet``, ``params=300w_paper``);
  * its stages one by one: decoding to gray, the face detector, cutting the crops, the network, the decoding of
    the heatmaps (each jit-compiled on its own, so their sum is near, not equal to, the fused end-to-end time);
  * with --peers (``pip install "lgcn_jax[peers]"``): dlib's HOG detector at upsample 0 and 1 with its 68-point
    predictor, decoding included.
Also, on a 640x480 clip (bench/bench_video.py's), ``track`` in frames per second, and ``lgcn-detect photo.jpg``
in a fresh process with a warm compilation cache (the median of --fresh runs after one that fills it).
Writes bench/results_realtime.json.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from bench_video import clip
from common import machine, write_results
from peers import Dlib

import jax
import matplotlib
import numpy as np
from PIL import Image

import lgcn_jax
from data_prep.layout_300w import read_pts
from lgcn_jax import crop as crop_lib
from lgcn_jax.detectors import get_detector
from lgcn_jax.image_io import load_gray
from lgcn_jax.machine import defaults
from lgcn_jax.network import apply
from lgcn_jax.postprocess import postprocess_with_confidence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHOTO = os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "sample_data", "grace_hopper.jpg")


def _canvas(image: Image.Image, size: tuple[int, int], scale: float) -> Image.Image:
    gray = image.convert("L")
    gray = gray.resize((max(1, round(gray.width * scale)), max(1, round(gray.height * scale))), Image.BILINEAR)
    canvas = Image.new("L", size, 110)
    canvas.paste(gray, ((size[0] - gray.width) // 2, (size[1] - gray.height) // 2))
    return canvas


def photo_sets(data: str, n: int, folder: str) -> dict[str, list[str]]:
    """The two sets of photos as JPEG files under ``folder``: {"640x480": [...], "small frames": [...]}."""
    sets = {"640x480": [], "small frames": []}
    lfpw = sorted(glob.glob(os.path.join(data, "lfpw", "testset", "*.jpg")))[:n]
    helen = sorted(glob.glob(os.path.join(data, "helen", "testset", "*.jpg")))[:n]
    if not lfpw or not helen:  # no 300-W here: the bundled photo at the same scales
        lfpw, helen = [PHOTO] * n, [PHOTO] * n
    for k, path in enumerate(lfpw):
        out = os.path.join(folder, f"vga_{k:02d}.jpg")
        _canvas(Image.open(path), (640, 480), 1.0 if path != PHOTO else 0.25).save(out, quality=90)
        sets["640x480"].append(out)
    for k, (path, side) in enumerate(zip(helen, np.linspace(80, 150, len(helen)))):
        if path == PHOTO:
            scale = side / 260.0  # the bundled photo's face spans about 260 px
        else:
            p = read_pts(os.path.splitext(path)[0] + ".pts")
            scale = side / float((p.max(0) - p.min(0)).max())
        out = os.path.join(folder, f"small_{k:02d}.jpg")
        _canvas(Image.open(path), (400, 300), scale).save(out, quality=90)
        sets["small frames"].append(out)
    return sets


def best_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(1e3 * (time.perf_counter() - t))
    return min(times)


def stages(path: str, model, detector, repeats: int) -> dict[str, float]:
    """ms of each stage of one pass of ``detect`` on one photo (its largest face)."""
    size, ratio = model.data.image_size, crop_lib.crop_ratio(model.data.dataset)
    gray = load_gray(path)
    found = detector(gray)
    out = {"decode": best_ms(lambda: load_gray(path), repeats), "detector": best_ms(lambda: detector(gray), repeats)}
    if not found:
        return out
    d = max(found, key=lambda d: d.size)
    m = crop_lib.similarity(d.center, d.size * ratio, d.angle, size)
    out["crop"] = best_ms(lambda: crop_lib.warp(gray, m, size), repeats)
    x = crop_lib.warp(gray, m, size)[None, ..., None]
    heat = apply(model.params, x)
    out["network"] = best_ms(lambda: apply(model.params, x), repeats)
    out["decoding"] = best_ms(lambda: postprocess_with_confidence(heat, model.shape_model, model.postprocess), repeats)
    return out


def median(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if key in r]
    return float(statistics.median(values)) if values else None


def fresh_process_s(photo: str, runs: int) -> float:
    """Wall seconds of ``lgcn-detect photo`` in a new Python process, the compilation cache warm."""
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(runs + 1):  # the first run fills the caches
            out = os.path.join(tmp, f"out{k}")
            t = time.perf_counter()
            r = subprocess.run([sys.executable, "-m", "lgcn_jax.cli.detect", photo, "--out", out, "--no_progress"],
                               capture_output=True, text=True, cwd=tmp, env=dict(os.environ, PYTHONPATH=REPO))
            if r.returncode != 0:
                raise RuntimeError(f"lgcn-detect failed:\n{r.stderr[-2000:]}")
            if k:
                times.append(time.perf_counter() - t)
    return float(statistics.median(times))


def track_fps(frames: list[np.ndarray], model) -> float:
    list(lgcn_jax.track(frames[:12], model))  # compile every shape once
    t = time.perf_counter()
    list(lgcn_jax.track(frames, model))
    return len(frames) / (time.perf_counter() - t)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=os.path.join(REPO, "..", "shared", "data", "300w_partial"))
    p.add_argument("--photos", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--variant", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                   help="another setting of detect() timed end to end, e.g. refine=1 or params=300w_paper,refine=1")
    p.add_argument("--peers", action="store_true", help="also dlib at upsample 0 and 1 (pip install 'lgcn_jax[peers]')")
    p.add_argument("--frames", type=int, default=120, help="frames of the 640x480 clip for track (0 skips it)")
    p.add_argument("--fresh", type=int, default=3, help="fresh-process runs of lgcn-detect (0 skips them)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results_realtime.json"))
    args = p.parse_args(argv)
    lgcn_jax.enable_compilation_cache()
    machine_defaults = defaults()
    model = lgcn_jax.default_model()
    detector = get_detector(None)
    variants = {"default": {}}
    for v in args.variant:
        variants[v] = {k: (int(x) if x.isdigit() else x) for k, x in (kv.split("=", 1) for kv in v.split(","))}
    peers = {f"dlib up{u}": Dlib(u) for u in (0, 1)} if args.peers else {}  # decoding included, as for detect(path)
    folder = tempfile.mkdtemp(prefix="lgcn_realtime_")
    result = {"machine": machine(), "defaults": vars(machine_defaults) if hasattr(machine_defaults, "__dict__") else str(machine_defaults),
              "model": model.name, "sets": {}}
    try:
        sets = photo_sets(args.data, args.photos, folder)
        for name, paths in sets.items():
            rows = []
            for path in paths:
                row = stages(path, model, detector, args.repeats)
                for label, kw in variants.items():
                    lgcn_jax.detect(path, **kw)  # compiles the shapes of this variant once
                    row[f"detect {label}"] = best_ms(lambda: lgcn_jax.detect(path, **kw), args.repeats)
                    row[f"faces {label}"] = len(lgcn_jax.detect(path, **kw))
                for label, peer in peers.items():
                    run = lambda: peer.landmarks(np.asarray(Image.open(path).convert("L")))  # noqa: E731
                    row[label] = best_ms(run, args.repeats)
                    row[f"faces {label}"] = len(run())
                rows.append(row)
            keys = [k for k in rows[0] if not k.startswith("faces")]
            summary = {k: median(rows, k) for k in keys}
            summary["found"] = {k[len("faces "):]: sum(r[k] > 0 for r in rows) for k in rows[0] if k.startswith("faces")}
            summary["photos"] = len(rows)
            if peers:
                summary["default_over_dlib_up0"] = summary["detect default"] / summary["dlib up0"]
            result["sets"][name] = summary
        if args.frames:
            result["track_fps_640x480"] = track_fps(clip(args.frames, 640, 480), model)
        if args.fresh:
            result["lgcn_detect_fresh_process_s"] = fresh_process_s(sets["640x480"][0], args.fresh)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"{result['machine']['device']}, {result['machine']['processor']}, {result['machine']['cpu_count']} CPUs; "
          f"defaults: {machine_defaults}")
    for name, s in result["sets"].items():
        print(f"\n{name} ({s['photos']} photos, median of the best of {args.repeats}; ms):")
        for k, v in s.items():
            if isinstance(v, float):
                print(f"  {k:<28} {v:8.2f}")
        print(f"  photos with a face found: {s['found']}")
    if "track_fps_640x480" in result:
        print(f"\ntrack, 640x480 clip: {result['track_fps_640x480']:.1f} frames/s")
    if "lgcn_detect_fresh_process_s" in result:
        print(f"lgcn-detect photo.jpg in a fresh process (warm cache): {result['lgcn_detect_fresh_process_s']:.2f} s")
    return write_results(result, args.out)


if __name__ == "__main__":
    main()
