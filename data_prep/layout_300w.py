"""The 300-W folder layout, split sizes and .pts files (no TensorFlow needed: the array export path and the
benchmarks read it too)."""

from __future__ import annotations

import os
import re

import numpy as np

from lgcn_jax.landmarks68 import NUM_POINTS

__all__ = ["BadFileError", "read_pts", "SUBSETS", "OFFICIAL_SIZES", "OFFICIAL_FOLDER_SIZES", "missing_folders", "folder_report", "absent_split_message"]

SUBSETS = {
    "train": ("afw", "helen/trainset", "lfpw/trainset"),
    "common": ("helen/testset", "lfpw/testset"),
    "challenging": ("ibug",),
    "test": ("300W/01_Indoor", "300W/02_Outdoor"),
}
SUBSETS["full"] = SUBSETS["common"] + SUBSETS["challenging"]
OFFICIAL_SIZES = {"train": 3148, "common": 554, "challenging": 135, "full": 689, "test": 600}
# Faces per folder in the official archives (the .pts files of each).
OFFICIAL_FOLDER_SIZES = {
    "afw": 337, "helen/trainset": 2000, "lfpw/trainset": 811, "helen/testset": 330, "lfpw/testset": 224, "ibug": 135,
    "300W/01_Indoor": 300, "300W/02_Outdoor": 300,
}


def missing_folders(root: str, split: str) -> list[str]:
    """The subset folders of ``split`` that are absent under ``root``."""
    return [sub for sub in SUBSETS[split] if not os.path.isdir(os.path.join(root, sub))]


def folder_report(root: str) -> list[str]:
    """One line for each subset folder that is absent or holds fewer faces than the official archive."""
    lines = []
    for folder, official in OFFICIAL_FOLDER_SIZES.items():
        path = os.path.join(root, folder)
        needed_by = [s for s in OFFICIAL_SIZES if folder in SUBSETS[s]]
        if not os.path.isdir(path):
            lines.append(f"{path} is absent (0 of {official} faces): not building {', '.join(needed_by)}; "
                         f"add the folder and rebuild to get {'it' if len(needed_by) == 1 else 'them'}")
            continue
        n = sum(1 for f in os.listdir(path) if f.lower().endswith(".pts"))
        if n != official:
            lines.append(f"{path} holds {n} of {official} faces: {', '.join(needed_by)} will be {'smaller' if n < official else 'larger'} than the official split")
    return lines


def absent_split_message(split: str, data_dir: str) -> str:
    """How to add a split that a partial build left out (or that 300-W does not have)."""
    if split not in SUBSETS:
        return (f"300-W has no split {split!r} (its splits: {', '.join(OFFICIAL_SIZES)}; training runs validate on faces "
                f"held out of train, see data.validation_faces)")
    folders = ", ".join(SUBSETS[split])
    return (f"the 300-W split {split!r} is not in the build under {data_dir}: it needs {folders} in the --manual_dir. "
            f"Add {'that folder' if len(SUBSETS[split]) == 1 else 'those folders'} and rebuild with "
            f"`python -m data_prep.build_300w --manual_dir PATH/TO/300W --data_dir {data_dir} --overwrite`")


class BadFileError(ValueError):
    """A 300-W file cannot be used; the message names it."""


def read_pts(path: str) -> np.ndarray:
    """f32[68, 2] 0-indexed (x, y) points of an iBUG .pts file (which counts from 1)."""
    try:
        with open(path, encoding="utf-8", errors="strict") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise BadFileError(f"{path}: cannot read ({e})") from e
    m = re.search(r"n_points\s*:\s*(\d+)", text)
    body = re.search(r"\{([^}]*)\}", text, re.S)
    if not m or not body:
        raise BadFileError(f"{path}: not an iBUG .pts file (expected 'n_points: 68' and the points between '{{' and '}}')")
    declared = int(m.group(1))
    rows = [r.split() for r in body.group(1).strip().splitlines() if r.strip()]
    if declared != NUM_POINTS or len(rows) != NUM_POINTS:
        raise BadFileError(f"{path}: has {len(rows)} points (header says {declared}); 300-W faces have {NUM_POINTS}")
    try:
        pts = np.array([[float(a), float(b)] for a, b in rows], np.float64)
    except ValueError as e:
        raise BadFileError(f"{path}: a point is not two numbers ({e})") from e
    if not np.all(np.isfinite(pts)):
        bad = int(np.nonzero(~np.all(np.isfinite(pts), axis=1))[0][0])
        raise BadFileError(f"{path}: point {bad + 1} is not finite ({rows[bad]})")
    return (pts - 1.0).astype(np.float32)
