"""lgcn-extract INPUT... --out DIR: 68 landmarks of every face in a dataset as a Parquet table; a resumable Ray Data job.

Examples:
  lgcn-extract photos/ --out landmarks                          # a folder, recursively; Ray starts on this machine
  lgcn-extract 'frames/*/*.png' list.txt clip.mp4 --out out --every 5   # a glob, a list of paths, every 5th video frame
  lgcn-extract ffhq_raw/ --out ffhq --align ffhq --size 1024    # and FFHQ-aligned crops beside the table
  lgcn-extract /shared/faces --out /shared/out --ray_address auto       # on the Ray cluster this machine belongs to
  ray job submit -- lgcn-extract /shared/faces --out /shared/out        # on the head node (Ray sets RAY_ADDRESS)

Killed, it resumes when run again the same way.  The table: lgcn_jax.read_landmarks(DIR) (docs/extract.md).
"""

from __future__ import annotations

import argparse
import sys

from lgcn_jax.detectors import DETECTORS
from lgcn_jax.errors import CheckpointError, ShapeModelError
from lgcn_jax.extraction import extract
from lgcn_jax.release import DEFAULT_WEIGHTS

__all__ = ["main", "parser"]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lgcn-extract", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="a folder (its images and videos, recursively), a glob, a .txt file of paths (one a line), an image or a video")
    p.add_argument("--out", required=True, help="the job's folder: job.json, landmarks/part-NNNNN.parquet, aligned/")
    p.add_argument("--checkpoint", help=f"released weights by name or a model folder; default: {DEFAULT_WEIGHTS['cpu']} on CPU workers, "
                                        f"{DEFAULT_WEIGHTS['accelerator']} on GPU workers")
    p.add_argument("--first_pass", help="weights for the first of the two passes (default: --checkpoint's)")
    p.add_argument("--detector", default="yunet", choices=sorted(DETECTORS), help="face detector (default: yunet)")
    p.add_argument("--flip_test", action="store_true", help="also run the last pass on each mirrored face (more accurate, slower)")
    p.add_argument("--every", type=int, default=1, help="videos: every Nth frame (default: 1, every frame)")
    p.add_argument("--align", choices=["ffhq"], help="also write each face's aligned crop (ffhq: the FFHQ alignment from eyes and mouth)")
    p.add_argument("--size", type=int, default=1024, help="aligned crops: side in pixels (default: 1024)")
    p.add_argument("--image_format", choices=["png", "jpg"], default="png", help="aligned crops: file format (default: png)")
    p.add_argument("--shard_size", type=int, default=256, help="inputs per Parquet file, the unit of resuming (default: 256)")
    p.add_argument("--batch_size", type=int, default=16, help="images per batch of each stage (default: 16)")
    p.add_argument("--workers", type=int, help="model actors (default: one per GPU, else one per --cpus_per_worker CPUs)")
    p.add_argument("--cpus_per_worker", type=float, default=1.0, help="CPUs of each actor (default: 1)")
    p.add_argument("--gpus_per_worker", type=float, help="GPUs of each actor (default: 1 where the cluster has GPUs, else 0)")
    p.add_argument("--ray_address", help="a running Ray cluster (default: $RAY_ADDRESS; without either Ray starts on this machine)")
    p.add_argument("--overwrite", action="store_true", help="start again where --out holds a job with other inputs or settings")
    p.add_argument("--no_progress", action="store_true")
    p.add_argument("--no_cache", action="store_true", help="do not keep compiled programs between runs (default: ~/.cache/lgcn_jax/xla)")
    return p


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.workers is not None and args.workers < 1:
        p.error(f"--workers must be at least 1, got {args.workers}")
    if args.batch_size < 1:
        p.error(f"--batch_size must be at least 1, got {args.batch_size}")
    try:
        s = extract(args.inputs, args.out, params=args.checkpoint, first_pass=args.first_pass, detector=args.detector,
                    flip_test=args.flip_test, every=args.every, align=args.align, size=args.size, image_format=args.image_format,
                    shard_size=args.shard_size, batch_size=args.batch_size, workers=args.workers, cpus_per_worker=args.cpus_per_worker,
                    gpus_per_worker=args.gpus_per_worker, ray_address=args.ray_address, overwrite=args.overwrite,
                    progress=not args.no_progress, compilation_cache=not args.no_cache)
    except (CheckpointError, ShapeModelError, ValueError, ImportError) as e:
        print(f"lgcn-extract: error: {e}", file=sys.stderr)
        return 1
    images = s["inputs"] - s["videos"]
    done = f" ({s['skipped']} done before)" if s["skipped"] else ""
    videos = f", {s['videos']} videos ({s['frames']} frames)" if s["videos"] else ""
    print(f"lgcn-extract: {images} images{videos}{done}: {s['faces']} faces, {s['no_face']} without a face, {s['errors']} errors, "
          f"in {s['seconds']:.1f} s ({s['images_per_s']:.2f} images/s); table: {s['out']}/landmarks ({s['shards']} shards written)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
