"""300-W as a TFDS dataset, built from the official downloads on disk.

    python -m data_prep.build_300w --manual_dir /data/300W_raw --data_dir ~/tensorflow_datasets [--skip_bad]

Expected layout under --manual_dir (as the official archives unpack; every image
beside a .pts file of 68 1-indexed points; .jpg, .jpeg or .png)::

    afw/                      337 faces   -> train
    helen/trainset/          2000 faces   -> train
    helen/testset/            330 faces   -> common
    lfpw/trainset/            811 faces   -> train
    lfpw/testset/             224 faces   -> common
    ibug/                     135 faces   -> challenging
    300W/01_Indoor/           300 faces   -> test   (optional: the 300-W private test set)
    300W/02_Outdoor/          300 faces   -> test

Splits: train 3148, common 554, challenging 135, full = common + challenging 689,
test 600.  Each example is one face: the crop (``lgcn_jax.crop``: a square
around the landmarks' bounding box with a 20% margin on each side) resized to
96x96 grayscale, the landmarks in crop pixels (0-indexed, pixel centres at
integers), the crop box in original pixels, and the original file name and
size, so predictions map back with ``lgcn_jax.crop.to_original``.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import re

import numpy as np
import tensorflow_datasets as tfds

from data_prep.layout_300w import (OFFICIAL_FOLDER_SIZES, OFFICIAL_SIZES, SUBSETS, BadFileError, absent_split_message, folder_report,
                                   missing_folders, read_pts)
from lgcn_jax import crop as crop_lib
from lgcn_jax.image_io import ImageError, load_gray
from lgcn_jax.landmarks68 import NUM_POINTS

__all__ = ["Face300W", "Face300WConfig", "SUBSETS", "OFFICIAL_SIZES", "BadFileError", "read_pts", "find_faces", "config_for", "main"]

log = logging.getLogger("data_prep.build_300w")

if __name__ == "__main__":
    # `python -m data_prep.build_300w`: run the module under its package name, before this copy
    # defines the builder (TFDS registers each builder name once and locates it by its package).
    from data_prep.build_300w import main as _main

    raise SystemExit(_main())

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


def _image_for(pts_path: str) -> str:
    stem = os.path.splitext(pts_path)[0]
    candidates = [stem]
    base = re.sub(r"_\d+$", "", stem)  # some copies share one image between faces: name_1.pts, name_2.pts -> name.jpg
    if base != stem:
        candidates.append(base)
    for c in candidates:
        for ext in IMAGE_EXTENSIONS:
            for e in (ext, ext.upper()):
                if os.path.exists(c + e):
                    return c + e
    raise BadFileError(f"{pts_path}: no image beside it (looked for {os.path.basename(stem)} with {', '.join(IMAGE_EXTENSIONS)})")


def find_faces(root: str, split: str) -> list[str]:
    """Sorted .pts paths of a split; raises if a subset folder is missing."""
    paths = []
    for sub in SUBSETS[split]:
        folder = os.path.join(root, sub)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{folder} does not exist: the {split} split needs {', '.join(SUBSETS[split])} under {root} (see docs/data.md: 300-W)")
        paths += sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith(".pts"))
    return paths


@dataclasses.dataclass
class Face300WConfig(tfds.core.BuilderConfig):
    image_size: int = 96
    margin: float = crop_lib.CROP_MARGIN


class Face300W(tfds.core.GeneratorBasedBuilder):
    """300-W faces cropped around their landmarks (68-point iBUG markup)."""

    name = "face300w"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Crops of 300-W train/common/challenging/full and the private test set."}
    BUILDER_CONFIGS = [Face300WConfig(name="crop96", description="96x96 grayscale crops, 20% margin")]
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    Download 300-W (https://ibug.doc.ic.ac.uk/resources/300-W/): the AFW, HELEN, LFPW and IBUG
    archives, and optionally the 300-W private test set. Unpack them into one folder so that it
    holds afw/, helen/trainset, helen/testset, lfpw/trainset, lfpw/testset, ibug/ and 300W/01_Indoor,
    300W/02_Outdoor, and pass that folder as --manual_dir.
    """

    def __init__(self, *, skip_bad: bool = False, exif: str = "error", workers: int = 4, **kwargs):
        self._skip_bad, self._exif, self._workers = skip_bad, exif, workers
        self.skipped: dict[str, list[str]] = {}
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        s = self.builder_config.image_size
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(s, s, 1), dtype=np.uint8),
                "landmarks": tfds.features.Tensor(shape=(NUM_POINTS, 2), dtype=np.float32),
                "box": tfds.features.Tensor(shape=(4,), dtype=np.float32),
                "file_name": tfds.features.Text(),
                "original_size": tfds.features.Tensor(shape=(2,), dtype=np.int32),
            }),
            supervised_keys=None,
            homepage="https://ibug.doc.ic.ac.uk/resources/300-W/",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        root = str(dl_manager.manual_dir)
        self.report = folder_report(root)
        for line in self.report:
            log.warning("%s", line)
        splits = {}
        for name in ("train", "common", "challenging", "full", "test"):
            if missing_folders(root, name):
                continue  # said once per folder above
            splits[name] = self._generate_examples(root, find_faces(root, name), name)
        if not splits:
            raise FileNotFoundError(f"no 300-W subset folder under {root}: expected {', '.join(OFFICIAL_FOLDER_SIZES)} (see docs/data.md: 300-W)")
        return splits

    def _example(self, root: str, pts_path: str):
        points = read_pts(pts_path)
        image_path = _image_for(pts_path)
        gray = load_gray(image_path, exif=self._exif)
        h, w = gray.shape
        if np.all((points[:, 0] < -0.5) | (points[:, 0] > w - 0.5) | (points[:, 1] < -0.5) | (points[:, 1] > h - 0.5)):
            raise BadFileError(f"{pts_path}: every point lies outside its {w}x{h} image {image_path}")
        cfg = self.builder_config
        box = crop_lib.landmark_box(points, cfg.margin)
        key = os.path.relpath(pts_path, root).replace(os.sep, "/")
        return key, {
            "image": crop_lib.crop(gray, box, cfg.image_size)[..., None],
            "landmarks": crop_lib.to_crop(points, box, cfg.image_size),
            "box": box,
            "file_name": os.path.relpath(image_path, root).replace(os.sep, "/"),
            "original_size": np.array([h, w], np.int32),
        }

    def _generate_examples(self, root: str, pts_paths: list[str], split: str):
        skipped = []

        def one(path):
            try:
                return self._example(root, path), None
            except (BadFileError, ImageError) as e:
                if not self._skip_bad:
                    raise
                return None, str(e)

        with concurrent.futures.ThreadPoolExecutor(self._workers) as pool:  # PIL decodes outside the GIL
            for example, error in pool.map(one, pts_paths):
                if error:
                    skipped.append(error)
                    log.warning("skipped: %s", error)
                    continue
                yield example
        self.skipped[split] = skipped
        kept = len(pts_paths) - len(skipped)
        if skipped:
            log.warning("%s: skipped %d bad file(s) of %d (--skip_bad)", split, len(skipped), len(pts_paths))
        if kept != OFFICIAL_SIZES[split]:
            log.warning("%s: %d faces, the official split has %d", split, kept, OFFICIAL_SIZES[split])


def config_for(image_size: int):
    """The builder config of crops of this size: the registered "crop96", or a custom one."""
    if image_size == 96:
        return "crop96"
    return Face300WConfig(name=f"crop{image_size}", image_size=image_size, description=f"{image_size}x{image_size} grayscale crops, 20% margin")


def main(argv=None) -> int:
    import argparse
    import sys

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manual_dir", required=True, help="the folder holding afw/, helen/, lfpw/, ibug/ (and 300W/)")
    p.add_argument("--data_dir", default=None, help="TFDS data dir to write to (default: ~/tensorflow_datasets)")
    p.add_argument("--image_size", type=int, default=96)
    p.add_argument("--skip_bad", action="store_true", help="skip unusable files (counted in the log) instead of stopping at the first")
    p.add_argument("--exif", choices=["error", "stored", "apply"], default="error",
                   help="images with an EXIF orientation: stop (default), use the stored pixels, or rotate as viewers do")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--overwrite", action="store_true", help="rebuild even if this data dir already holds a build (e.g. after adding ibug/)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if not os.path.isdir(args.manual_dir):
        print(f"build_300w: error: --manual_dir {args.manual_dir} is not a folder", file=sys.stderr)
        return 1
    if all(missing_folders(args.manual_dir, s) for s in OFFICIAL_SIZES):
        print(f"build_300w: error: no 300-W subset folder under --manual_dir {args.manual_dir}: expected "
              f"{', '.join(OFFICIAL_FOLDER_SIZES)} as the archives unpack (docs/data.md: 300-W)", file=sys.stderr)
        return 1
    config = config_for(args.image_size)
    builder = Face300W(data_dir=args.data_dir, config=config, skip_bad=args.skip_bad, exif=args.exif, workers=args.workers)
    try:
        if builder.is_prepared() and not args.overwrite:
            print(f"a build already exists in {builder.data_dir}; keeping it (rerun with --overwrite to rebuild)")
        mode = tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if args.overwrite else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
            manual_dir=args.manual_dir, try_download_gcs=False, download_mode=mode))
    except (BadFileError, ImageError, FileNotFoundError) as e:
        print(f"build_300w: error: {e}\nNo build was written (TFDS only moves a finished build into place); fix or remove the file, or rerun with --skip_bad.", file=sys.stderr)
        return 1
    for split, info in builder.info.splits.items():
        skipped = len(builder.skipped.get(split, []))
        print(f"{split:<12} {info.num_examples:>5} faces" + (f"  ({skipped} skipped)" if skipped else ""))
    print(f"written to {builder.data_dir}")
    return 0

