"""lgcn-detect IMAGE_OR_VIDEO... --out DIR: per image a JSON and an annotated PNG; per video JSON lines and an annotated mp4."""

from __future__ import annotations

import argparse
import os
import sys

from tqdm.auto import tqdm

from lgcn_jax.annotate import annotate_image, annotate_video, result_name
from lgcn_jax.executables import enable_program_store
from lgcn_jax.detect import first_pass_model
from lgcn_jax.detectors import get_detector
from lgcn_jax.errors import CheckpointError, ImageError, ShapeModelError, VideoError
from lgcn_jax.files import unique_names
from lgcn_jax.machine import DEFAULTS
from lgcn_jax.release import resolve_model
from lgcn_jax.video import is_video

__all__ = ["main", "parser", "output_names"]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lgcn-detect", description="68 facial landmarks for every face in each image or video.")
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_VIDEO",
                   help="photos (any format Pillow reads) and videos (.mp4, .avi, .mov, .mkv, .m4v, .webm; faces tracked from frame to frame)")
    p.add_argument("--out", required=True, help="folder for NAME.json and NAME_landmarks.png (videos: NAME.jsonl and NAME_landmarks.mp4)")
    p.add_argument("--detector", help="face detector: yunet, yunet-fast, yunet-jax, haar, dlib (lgcn_jax.detectors.DETECTORS); "
                                      f"default: {DEFAULTS['cpu'].detector} where JAX runs on the CPU, {DEFAULTS['accelerator'].detector} "
                                      "on a GPU or TPU")
    p.add_argument("--refine", type=int, help="passes re-cut from the landmarks after the first (0: one pass); default: "
                                              f"{DEFAULTS['cpu'].refine} on the CPU, {DEFAULTS['accelerator'].refine} on a GPU or TPU")
    p.add_argument("--detect_every", type=int, default=10, help="videos: frames between face detector runs (it also runs when a face is lost)")
    p.add_argument("--checkpoint", help=f"a checkpoint folder, or the name of released weights; default: {DEFAULTS['cpu'].weights} where JAX "
                                        f"runs on the CPU, {DEFAULTS['accelerator'].weights} on a GPU or TPU")
    p.add_argument("--first_pass", help="weights for the first of the two passes, which only frames the second one's crop "
                                        "(default: the --checkpoint model)")
    p.add_argument("--flip_test", action="store_true", help="also run the final pass on each mirrored face and average the heatmaps "
                   "(postprocess.flip_test: more accurate, slower)")
    p.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    p.add_argument("--no_progress", action="store_true")
    p.add_argument("--no_cache", action="store_true",
                   help="do not keep compiled programs between runs (default: in ~/.cache/lgcn_jax/programs; not where JAX's own "
                        "persistent cache is on, $JAX_COMPILATION_CACHE_DIR)")
    return p


def output_names(paths) -> list[str]:
    """One result name per input: a.jpg, a.png and a_2.jpg -> a, a_2, a_2_2 (no name is given twice)."""
    return unique_names(os.path.splitext(os.path.basename(path))[0] for path in paths)


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.detect_every < 1:
        p.error(f"--detect_every must be at least 1, got {args.detect_every}")
    if args.refine is not None and args.refine < 0:
        p.error(f"--refine must be >= 0, got {args.refine}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        p.error(f"--out {args.out} is a file; results go to a folder")
    if not args.no_cache:
        enable_program_store()  # predict stored whole between runs: no tracing (lgcn_jax.executables)
    try:
        model = resolve_model(args.checkpoint or None, "--checkpoint")
        if args.flip_test:
            model = model.with_postprocess(flip_test=True)
        first_pass = first_pass_model(args.first_pass, model)
        detector = get_detector(args.detector)
    except (CheckpointError, ShapeModelError, ValueError, ImportError) as e:
        print(f"lgcn-detect: error: {e}", file=sys.stderr)
        return 1
    os.makedirs(args.out, exist_ok=True)
    names = output_names(args.images)
    if not args.overwrite:
        clash = [n for n, path in zip(names, args.images) if os.path.exists(result_name(args.out, n, path))]
        if clash:
            print(f"lgcn-detect: error: {args.out} already holds results for {', '.join(clash[:5])}; nothing was written. "
                  "Use another --out or --overwrite.", file=sys.stderr)
            return 1
    failed = 0
    for path, name in zip(args.images, names):
        if not is_video(path):
            continue
        try:
            summary = annotate_video(path, args.out, model, name, detector=detector, detect_every=args.detect_every,
                                     progress=not args.no_progress, first_pass=first_pass, refine=args.refine)
        except VideoError as e:
            print(f"lgcn-detect: {e}", file=sys.stderr)
            failed += 1
            continue
        print(f"{path}: {summary['frames']} frames, {summary['faces']} face(s) in all, {summary['fps']:.1f} frames/s")
    images = [(path, name) for path, name in zip(args.images, names) if not is_video(path)]
    for path, name in tqdm(images, disable=args.no_progress or not images, unit="image"):
        try:
            faces = annotate_image(path, args.out, model, name, detector=detector, first_pass=first_pass, refine=args.refine)
        except ImageError as e:
            print(f"lgcn-detect: skipped {path}: {e}", file=sys.stderr)
            failed += 1
            continue
        print(f"{path}: {len(faces)} face(s)")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
