"""Landmarks for a whole dataset: a resumable job on Ray Data (``lgcn-extract``), embedded here or on a cluster.

    lgcn_jax.extract(["faces/"], "out")             # Ray started on this machine; ray_address="auto" on a cluster's node
    table = lgcn_jax.read_landmarks("out")          # pandas: a row per face, and one per image without a face

The pipeline streams (Ray Data): the inputs, sorted, one unit per image or video -> ``_find_faces`` (decode, face
detector) -> ``_Landmarker`` (an actor pool holding the jit-compiled model: crops, network, aligned crops) -> this
process, which writes each shard of ``shard_size`` inputs as one Parquet file once all its rows are in.  On CPUs the
actors run both steps, one actor per core; with GPUs the detector runs in tasks on the CPUs while the actors keep the
GPUs (a separate CPU stage beside CPU actors would wait for the cores the actors hold).

``OUT`` holds::

    job.json                    the inputs and the settings; a rerun with the same ones resumes
    landmarks/part-NNNNN.parquet  one row per face (``schema``), written whole (``files.atomic_path``) or not at all
    aligned/...                 with ``align``: the aligned crops, named in the rows

Resume: a killed job, run again the same way, processes the shards that are not on disk; each input belongs to one
shard, so the union is a straight run's table.  Inputs that cannot be read, or that hold no face, get a row saying so.
"""

from __future__ import annotations

import contextlib
import glob
import importlib
import io
import json
import logging
import os
import pickle
import shutil
import time
from typing import Iterator, Sequence

import numpy as np
from PIL import Image, ImageOps
from tqdm.auto import tqdm

from lgcn_jax import crop as crop_lib
from lgcn_jax.compilation_cache import enable_compilation_cache
from lgcn_jax.detect import detected_landmarks, first_pass_model
from lgcn_jax.detectors import DETECTORS, get_detector
from lgcn_jax.errors import CheckpointError
from lgcn_jax.files import atomic_path, unique_names
from lgcn_jax.image_io import IMAGE_EXTENSIONS, is_image, load_gray, open_image, to_gray
from lgcn_jax.landmarks68 import NUM_POINTS
from lgcn_jax.release import checkpoint_path, default_weights, is_folder, resolve_model
from lgcn_jax.video import VIDEO_EXTENSIONS, is_video, read_frames

__all__ = ["extract", "read_landmarks", "list_inputs", "schema", "JOB_FILE", "TABLE_DIR", "ALIGNED_DIR"]

JOB_FILE, TABLE_DIR, ALIGNED_DIR = "job.json", "landmarks", "aligned"
_FORMAT = 1  # of job.json and the table; a job of another format is not resumed
_INSTALL = "pip install 'lgcn_jax[extract]'"
_LIST_ENDINGS = (".txt", ".lst", ".list")


def _optional(name: str):
    """An optional dependency of the job, or one ImportError line naming the extra."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise ImportError(f"lgcn_jax.extract needs {name.split('.')[0]}: {_INSTALL}") from e


# ---------------------------------------------------------------------------------------------------------------- inputs

def list_inputs(inputs: str | Sequence[str]) -> list[str]:
    """The job's inputs as sorted absolute paths, each once.

    Each of ``inputs`` is a folder (its images and videos, recursively, by ending: ``image_io.IMAGE_EXTENSIONS``,
    ``video.VIDEO_EXTENSIONS``), a glob, a text file of paths (.txt, .lst, .list: one a line, relative to the file's
    folder; blank lines and ``#`` comments skipped), or one image or video.  A file named in a list or given itself is
    taken whatever its ending (an unreadable one gets an error row); an input that names nothing raises ValueError.
    """
    found: set[str] = set()
    for spec in [inputs] if isinstance(inputs, (str, os.PathLike)) else inputs:
        spec = os.path.expanduser(os.fspath(spec))
        if os.path.isdir(spec):
            media = [os.path.join(d, f) for d, _, fs in os.walk(spec, followlinks=True) for f in fs
                     if (is_image(f) or is_video(f)) and not f.startswith(".")]
            if not media:
                raise ValueError(f"{spec}: no image or video in this folder or below (endings: {', '.join(IMAGE_EXTENSIONS + VIDEO_EXTENSIONS)})")
            found.update(media)
        elif os.path.isfile(spec) and spec.lower().endswith(_LIST_ENDINGS):
            folder = os.path.dirname(os.path.abspath(spec))
            with open(spec) as f:
                listed = [line.strip() for line in f if line.strip() and not line.strip().startswith("#")]
            if not listed:
                raise ValueError(f"{spec}: the list names no file")
            found.update(os.path.join(folder, os.path.expanduser(line)) for line in listed)
        elif os.path.exists(spec):
            found.add(spec)
        elif glob.has_magic(spec):
            matches = [m for m in glob.glob(spec, recursive=True) if os.path.isfile(m)]
            if not matches:
                raise ValueError(f"{spec} matches no file")
            found.update(matches)
        else:
            raise ValueError(f"{spec}: no such file or folder (an input is a folder, a glob, a list of paths in a .txt file, "
                             "an image or a video)")
    return sorted({os.path.abspath(p) for p in found})


def _crop_stems(paths: Sequence[str]) -> list[str]:
    """Names of the aligned crops of each input: its path below the inputs' common folder, without the ending."""
    root = os.path.commonpath([os.path.dirname(p) for p in paths]) if paths else ""
    return unique_names(os.path.splitext(os.path.relpath(p, root))[0] for p in paths)


# ----------------------------------------------------------------------------------------------------------------- table

def schema():
    """The table's columns (pyarrow.Schema): one row per face; an image or frame without a face, or that could not be
    read, has one row with ``faces`` 0, null face columns and ``status`` "no_face" or "error" (the reason in ``error``).

    path: the input (absolute); frame: the video frame index (null for a still image); width, height: of the image as
    viewers show it (EXIF orientation applied; null where it could not be read); faces: faces found in that image or
    frame; face: this face's index there, left to right; box f32[4] (x0, y0, x1, y1) of the landmarks; score: the face
    detector's; landmarks f32[68][2] (x, y) in image pixels, pixel centres at integers; confidence f32[68]; angle: roll
    in radians; model: the weights' name; status; error; aligned: the crop's file below OUT (with ``align``);
    align_transform f64[6]: the [2, 3] affine map, row by row, from crop pixels to image pixels.
    """
    pa = _optional("pyarrow")
    f32 = pa.float32()
    return pa.schema([
        ("path", pa.string()), ("frame", pa.int32()), ("width", pa.int32()), ("height", pa.int32()), ("faces", pa.int32()),
        ("face", pa.int32()), ("box", pa.list_(f32, 4)), ("score", f32), ("landmarks", pa.list_(pa.list_(f32, 2), NUM_POINTS)),
        ("confidence", pa.list_(f32, NUM_POINTS)), ("angle", f32), ("model", pa.string()), ("status", pa.string()),
        ("error", pa.string()), ("aligned", pa.string()), ("align_transform", pa.list_(pa.float64(), 6)),
    ])


def _stream_schema():
    """``schema`` and what travels with each row to this process: its input, the input's count of images or frames
    (on the rows of its last one; else 0), the encoded aligned crop."""
    pa = _optional("pyarrow")
    return schema().append(pa.field("_unit", pa.int64())).append(pa.field("_items", pa.int32())).append(pa.field("_crop", pa.binary()))


def read_landmarks(out: str, format: str = "pandas"):
    """The table of a job's folder ``out`` (``schema``): a pandas DataFrame (``landmarks`` as f32[68, 2] arrays, integer
    columns nullable) or, with ``format="arrow"``, a pyarrow Table."""
    if format not in ("pandas", "arrow"):
        raise ValueError(f"format must be 'pandas' or 'arrow', got {format!r}")
    pa, pq = _optional("pyarrow"), _optional("pyarrow.parquet")
    shards = sorted(glob.glob(os.path.join(out, TABLE_DIR, "part-*.parquet")))
    if not shards and not os.path.exists(os.path.join(out, JOB_FILE)):
        raise FileNotFoundError(f"{out} holds no lgcn-extract output ({JOB_FILE} and {TABLE_DIR}/)")
    table = pa.concat_tables([pq.read_table(s) for s in shards]) if shards else schema().empty_table()
    if format == "arrow":
        return table
    pd = _optional("pandas")
    df = table.to_pandas(types_mapper={pa.int32(): pd.Int32Dtype()}.get)
    column = table.column("landmarks").combine_chunks()
    points = iter(np.asarray(column.flatten().flatten(), np.float32).reshape(-1, NUM_POINTS, 2))  # the faces' rows only
    df["landmarks"] = [next(points) if ok else None for ok in column.is_valid().to_pylist()]
    return df


# --------------------------------------------------------------------------------------------------- stage 1: find faces

def _rgb(im: Image.Image) -> np.ndarray:
    """u8[H, W, 3] of a PIL image as viewers show it (EXIF orientation applied, as ``load_gray``)."""
    return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))


def _item(unit: dict, frame: int | None, items: int, gray=None, rgb=None, found=None, error: str | None = None) -> dict:
    return {"_unit": unit["_unit"], "_items": items, "_stem": unit["_stem"], "path": unit["path"], "frame": frame,
            "width": None if gray is None else gray.shape[1], "height": None if gray is None else gray.shape[0], "error": error,
            "_payload": None if gray is None else pickle.dumps((gray, rgb, found), protocol=5)}


def _reason(e: BaseException) -> str:
    return str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"  # ImageError is a ValueError


def _find_faces(batch, *, detector: str, every: int, align: bool, chunk: int) -> Iterator:
    """Ray Data stage (tasks): each input of ``batch`` (pyarrow rows ``_unit``, ``_stem``, ``path``) decoded and its
    faces found; one item per image or kept video frame, ``chunk`` items a table; errors are items that say so."""
    pa = _optional("pyarrow")
    find = get_detector(detector)
    out = []
    for unit in batch.to_pylist():
        path = unit["path"]
        if is_video(path):
            frames = 0
            try:
                for i, rgb in enumerate(read_frames(path)):
                    if i % every:
                        continue
                    gray = to_gray(rgb)
                    out.append(_item(unit, i, 0, gray, rgb if align else None, find(gray)))
                    frames += 1
                    if len(out) > chunk:  # the last frame stays: it will say how many there were
                        yield pa.Table.from_pylist(out[:-1])
                        out = out[-1:]
                out[-1]["_items"] = frames  # rows are counted as they arrive: the last item says how many make the input
            except Exception as e:  # a video that cannot be read, or ends early: its frames so far stand
                out.append(_item(unit, None, frames + 1, error=_reason(e)))
        else:
            try:
                im = open_image(path)
                gray = load_gray(im)
                out.append(_item(unit, None, 1, gray, _rgb(im) if align else None, find(gray)))
            except Exception as e:  # one bad image is a row, never a stopped job
                out.append(_item(unit, None, 1, error=_reason(e)))
        if len(out) >= chunk:
            yield pa.Table.from_pylist(out)
            out = []
    if out:
        yield pa.Table.from_pylist(out)


# ------------------------------------------------------------------------------------------------ stage 2: the landmarks

class _Landmarker:
    """Ray Data stage (an actor each): the model, loaded and compiled once; a batch of items -> their rows.  With
    ``find`` (``_find_faces``' arguments) it takes inputs and finds their faces itself: the one stage of a CPU job,
    where a separate detector stage would wait for CPUs that the actors hold."""

    def __init__(self, weights: str, first_pass: str | None, flip_test: bool, refine: int, batch_size: int, align: str | None,
                 size: int, image_format: str, compilation_cache: bool, find: dict | None = None):
        if compilation_cache:
            enable_compilation_cache()
        self.model = resolve_model(weights, "weights")
        if self.model.params.config.num_landmarks != NUM_POINTS:
            raise ValueError(f"lgcn-extract writes the 68-point markup; {weights} marks {self.model.params.config.num_landmarks} points")
        if flip_test:
            self.model = self.model.with_postprocess(flip_test=True)
        self.first_pass = first_pass_model(first_pass, self.model)
        self.refine, self.batch_size = refine, batch_size
        self.align, self.size, self.image_format = align, size, image_format
        self.find = find
        self.schema = _stream_schema()

    def _faces(self, images: list[tuple]) -> list:
        """Faces of each (gray, rgb, found) as in ``detect_batch``; an image whose faces fail gives its exception."""
        try:
            return detected_landmarks(self.model, [g for g, _, _ in images], [f for _, _, f in images], self.refine, self.batch_size,
                                      self.first_pass)
        except Exception:
            if len(images) == 1:
                raise
        out = []
        for image in images:  # find the one that failed; the others keep their faces
            try:
                out.append(self._faces([image])[0])
            except Exception as e:
                out.append(e)
        return out

    def __call__(self, batch) -> Iterator:
        for items in _find_faces(batch, **self.find) if self.find is not None else [batch]:
            yield self._rows(items)

    def _rows(self, batch):
        pa = _optional("pyarrow")
        items = batch.to_pylist()
        decoded = {k: pickle.loads(it["_payload"]) for k, it in enumerate(items) if it["_payload"] is not None}
        faces = dict(zip(decoded, self._faces(list(decoded.values())))) if decoded else {}
        rows = []
        for k, it in enumerate(items):
            base = {name: it[name] for name in ("_unit", "_items", "path", "frame", "width", "height")}
            found = faces.get(k, [])
            error = it["error"] or (_reason(found) if isinstance(found, Exception) else None)
            if error is not None or not found:
                rows.append(dict(base, faces=0, model=self.model.name, status="error" if error else "no_face", error=error))
                continue
            for j, face in enumerate(found):
                rows.append(dict(base, faces=len(found), face=j, box=face.box.tolist(), score=face.score, landmarks=face.landmarks.tolist(),
                                 confidence=face.confidence.tolist(), angle=face.angle, model=self.model.name, status="ok",
                                 **self._aligned(decoded[k][1], face.landmarks, it, j)))
        return pa.Table.from_pylist(rows, schema=self.schema)

    def _aligned(self, rgb, points: np.ndarray, item: dict, k: int) -> dict:
        if self.align is None:
            return {}
        transform = crop_lib.ALIGNMENTS[self.align](points, self.size)
        buf = io.BytesIO()
        Image.fromarray(crop_lib.warp(rgb, transform, self.size)).save(buf, format="JPEG" if self.image_format == "jpg" else "PNG",
                                                                       **({"quality": 95} if self.image_format == "jpg" else {}))
        name = item["_stem"] + ("" if item["frame"] is None else f"/{item['frame']:06d}") + f"_{k}.{self.image_format}"
        return {"aligned": f"{ALIGNED_DIR}/{name}", "align_transform": transform.ravel().tolist(), "_crop": buf.getvalue()}


# ------------------------------------------------------------------------------------------------------- the job's folder

def _weights(spec: str | None) -> str | None:
    """Released weights by name, a folder as an absolute path (as ``Model.name`` records them); checked here, before
    Ray starts, loaded by each actor."""
    if spec is None:
        return None
    path = checkpoint_path(spec)  # an unknown name: a CheckpointError listing the released ones
    if not os.path.isdir(path):
        raise CheckpointError(f"{spec}: no such model folder")
    return os.path.abspath(path) if is_folder(spec) else spec


def _settings(weights: str | None, first_pass: str | None, detector: str, refine: int, flip_test: bool, every: int, align: str | None,
              size: int, image_format: str, shard_size: int) -> dict:
    """What determines the table: a rerun resumes only with the same.  ``weights`` None stays None here (the default
    depends on the workers' GPUs)."""
    if detector not in DETECTORS:
        raise ValueError(f"unknown face detector {detector!r}; choose one of {sorted(DETECTORS)}")
    if align is not None and align not in crop_lib.ALIGNMENTS:
        raise ValueError(f"unknown alignment {align!r}; choose one of {sorted(crop_lib.ALIGNMENTS)}")
    for name, value, least in (("refine", refine, 0), ("every", every, 1), ("size", size, 8), ("shard_size", shard_size, 1)):
        if value < least:
            raise ValueError(f"{name} must be at least {least}, got {value}")
    if image_format not in ("png", "jpg"):
        raise ValueError(f"image_format must be 'png' or 'jpg', got {image_format!r}")
    return {"weights": _weights(weights), "first_pass": _weights(first_pass), "detector": detector,
            "refine": refine, "flip_test": flip_test, "every": every, "align": align, "size": size if align else None,
            "image_format": image_format if align else None, "shard_size": shard_size}


def _check_out(out: str) -> None:
    """``out`` is new, empty or a job's folder: nothing of the user's is written over."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out} is a file; the job writes a folder")
    if os.path.isdir(out) and os.listdir(out) and not os.path.exists(os.path.join(out, JOB_FILE)):
        raise ValueError(f"{out} holds files and no {JOB_FILE}: it is not an lgcn-extract job; choose a new or empty folder")


def _prepare(out: str, inputs: list[str], settings: dict, overwrite: bool) -> set[int]:
    """Check ``out`` against the job and write its ``job.json``; the shards already done (none after ``overwrite``)."""
    job = {"format": _FORMAT, "settings": settings, "inputs": inputs}
    path = os.path.join(out, JOB_FILE)
    _check_out(out)
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        if overwrite:
            for sub in (TABLE_DIR, ALIGNED_DIR):
                shutil.rmtree(os.path.join(out, sub), ignore_errors=True)
        elif old != job:
            raise ValueError(f"{out} holds another job ({_difference(old, job)}); run it with its own inputs and settings to finish it, "
                             "or use --overwrite to start again, or another --out")
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(job, f, indent=1)
    table = os.path.join(out, TABLE_DIR)
    os.makedirs(table, exist_ok=True)
    for folder, _, files in os.walk(out):  # temporary files of a killed run (files.atomic_path's); written again
        for f in files:
            if f.startswith(".") and ".tmp" in f:
                os.remove(os.path.join(folder, f))
    return {int(f[5:10]) for f in os.listdir(table) if f.startswith("part-") and f.endswith(".parquet")}


def _difference(old: dict, new: dict) -> str:
    if old.get("format") != new["format"]:
        return f"format {old.get('format')}, this version writes {new['format']}"
    diff = [f"{k}: {old['settings'].get(k)!r} there, {v!r} now" for k, v in new["settings"].items() if old["settings"].get(k) != v]
    if old["inputs"] != new["inputs"]:
        added, gone = len(set(new["inputs"]) - set(old["inputs"])), len(set(old["inputs"]) - set(new["inputs"]))
        diff.append(f"inputs: {len(old['inputs'])} there, {len(new['inputs'])} now ({added} new, {gone} gone)")
    return "; ".join(diff)


def _shard_path(out: str, shard: int) -> str:
    return os.path.join(out, TABLE_DIR, f"part-{shard:05d}.parquet")


class _Writer:
    """Gathers the rows as they stream in and writes each shard once all its inputs are complete."""

    def __init__(self, out: str, paths: list[str], shards: dict[int, list[int]], shard_size: int):
        self.out, self.paths, self.shard_size = out, paths, shard_size
        self.waiting = {s: set(units) for s, units in shards.items()}  # shard -> inputs not yet complete
        self.tables: dict[int, list] = {s: [] for s in shards}
        self.rows: dict[tuple, int] = {}  # (input, frame) -> rows seen of that image
        self.items: dict[int, int] = {}  # input -> its images or frames seen complete
        self.expected: dict[int, int] = {}  # input -> its images or frames, once known
        self.counts = {"inputs": 0, "videos": 0, "frames": 0, "faces": 0, "no_face": 0, "errors": 0, "shards": 0}

    def add(self, table) -> None:
        for row in table.select(["_unit", "_items", "frame", "faces", "status", "aligned", "_crop"]).to_pylist():
            unit = row["_unit"]
            if row["_crop"] is not None:  # written now: a video's crops need not wait in memory for its shard
                with atomic_path(os.path.join(self.out, row["aligned"])) as tmp, open(tmp, "wb") as f:
                    f.write(row["_crop"])
            if row["_items"]:
                self.expected[unit] = row["_items"]
            key = (unit, row["frame"])
            self.rows[key] = self.rows.get(key, 0) + 1
            if self.rows[key] == max(row["faces"], 1):  # this image or frame is complete
                del self.rows[key]
                self.items[unit] = self.items.get(unit, 0) + 1
                self.counts["frames"] += row["frame"] is not None
                self.counts["faces"] += row["faces"]
                self.counts["no_face"] += row["status"] == "no_face"
                self.counts["errors"] += row["status"] == "error"
        table = table.drop_columns(["_crop"])
        units = table.column("_unit").to_numpy()
        for shard in np.unique(units // self.shard_size):
            self.tables[int(shard)].append(table.filter(units // self.shard_size == shard))
        for unit in np.unique(units).tolist():
            if unit in self.expected and self.items.get(unit) == self.expected[unit]:
                self._complete(unit)

    def _complete(self, unit: int) -> None:
        pa, pq = _optional("pyarrow"), _optional("pyarrow.parquet")
        shard = unit // self.shard_size
        self.waiting[shard].discard(unit)
        self.counts["inputs"] += 1
        self.counts["videos"] += is_video(self.paths[unit])
        if self.waiting[shard]:
            return
        table = pa.concat_tables(self.tables.pop(shard))
        table = table.sort_by([("_unit", "ascending"), ("frame", "ascending"), ("face", "ascending")])  # nulls last: a video's error
        table = table.select(schema().names)
        with atomic_path(_shard_path(self.out, shard), suffix=".parquet") as tmp:
            pq.write_table(table, tmp)
        del self.waiting[shard]
        self.counts["shards"] += 1


# ---------------------------------------------------------------------------------------------------------------- the job

def _start_ray(ray_address: str | None):
    """Ray: the instance this process already uses, else the cluster at ``ray_address`` (or $RAY_ADDRESS), else one
    started here on this machine's cores and GPUs.  Returns (ray, whether it was started here)."""
    ray = _optional("ray")
    _optional("ray.data")
    if ray.is_initialized():
        return ray, False
    address = ray_address or os.environ.get("RAY_ADDRESS") or "local"
    ray.init(address=address, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    return ray, True


def extract(inputs: str | Sequence[str], out: str, *, params: str | None = None, first_pass: str | None = None, detector: str = "yunet",
            refine: int = 1, flip_test: bool = False, every: int = 1, align: str | None = None, size: int = 1024, image_format: str = "png",
            shard_size: int = 256, batch_size: int = 16, workers: int | None = None, cpus_per_worker: float = 1.0,
            gpus_per_worker: float | None = None, ray_address: str | None = None, overwrite: bool = False, progress: bool = False,
            compilation_cache: bool = True) -> dict:
    """Landmarks of every face in ``inputs`` (``list_inputs``) as a Parquet table in folder ``out`` (``read_landmarks``).

    Args:
      params: released weights by name or a model folder (readable on every node); None: ``release.default_weights``
        of the workers (the paper network where they have GPUs).  ``first_pass``, ``detector`` (a name), ``refine``,
        ``flip_test``: as for ``detect``.
      every: videos: every ``every``-th frame (frames 0, every, 2 every, ...).
      align: "ffhq": also write each face's aligned crop (``crop.ffhq_alignment``), ``size`` px, as ``image_format``.
      shard_size: inputs per Parquet file; a killed job redoes at most the shards it had not written.
      batch_size: images per batch of each stage (their faces go through the network together).
      workers: model actors; None: one per GPU, or per ``cpus_per_worker`` CPUs where there is no GPU.
      gpus_per_worker: None: 1 where the cluster has GPUs, else 0.
      ray_address: a running cluster (also $RAY_ADDRESS); None: Ray starts here, on this machine's cores and GPUs.
        Where this process already runs Ray (``ray.init``), that instance serves.
      overwrite: start again where ``out`` holds a job with other inputs or settings (its table and crops are removed).
    Returns:
      a summary: inputs, skipped (done before), frames, faces, no_face, errors, shards, seconds, images_per_s, out.
    """
    start = time.perf_counter()
    paths = list_inputs(inputs)
    settings = _settings(params, first_pass, detector, refine, flip_test, every, align, size, image_format, shard_size)
    _check_out(out)
    ray, started = _start_ray(ray_address)
    try:
        resources = ray.cluster_resources()
        gpus = (1.0 if resources.get("GPU", 0) else 0.0) if gpus_per_worker is None else float(gpus_per_worker)
        settings["weights"] = settings["weights"] or default_weights("gpu" if gpus else "cpu")
        done = _prepare(out, paths, settings, overwrite)
        todo = [i for i in range(len(paths)) if i // shard_size not in done]
        shards: dict[int, list[int]] = {}
        for i in todo:
            shards.setdefault(i // shard_size, []).append(i)
        if workers is None:
            workers = int(resources.get("GPU", 0) // gpus) if gpus else int(resources.get("CPU", 1) // cpus_per_worker)
        writer = _Writer(out, paths, shards, shard_size)
        if todo:
            with _quiet_ray_data(ray):
                _run(ray, writer, paths, todo, settings, max(workers, 1), cpus_per_worker, gpus, batch_size, compilation_cache, progress)
    finally:
        if started:
            ray.shutdown()
    seconds = time.perf_counter() - start
    counts = writer.counts
    images = counts["inputs"] - counts["videos"] + counts["frames"]
    return dict(counts, skipped=len(paths) - len(todo), seconds=seconds, images_per_s=images / seconds, out=out)


@contextlib.contextmanager
def _quiet_ray_data(ray):
    """Ray Data's progress bars and notices off (ours counts images and faces), as they were afterwards."""
    context, logger = ray.data.DataContext.get_current(), logging.getLogger("ray.data")
    before = context.enable_progress_bars, context.print_on_execution_start, logger.level
    context.enable_progress_bars = context.print_on_execution_start = False
    logger.setLevel(logging.ERROR)  # e.g. that its progress bars are off
    try:
        yield
    finally:
        context.enable_progress_bars, context.print_on_execution_start = before[:2]
        logger.setLevel(before[2])


def _run(ray, writer: _Writer, paths: list[str], todo: list[int], settings: dict, workers: int, cpus: float, gpus: float,
         batch_size: int, compilation_cache: bool, progress: bool) -> None:
    stems = _crop_stems(paths)
    units = [{"_unit": i, "_stem": stems[i], "path": paths[i]} for i in todo]
    landmarker_args = dict(weights=settings["weights"], first_pass=settings["first_pass"], flip_test=settings["flip_test"],
                           refine=settings["refine"], batch_size=batch_size, align=settings["align"], size=settings["size"] or 0,
                           image_format=settings["image_format"] or "png", compilation_cache=compilation_cache)
    env = {}
    if not gpus and cpus <= 1:  # an actor per core: single-threaded convolutions, so that actors side by side do not contend
        env = {"XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_cpu_multi_thread_eigen=false".strip()}
    elif 0 < gpus < 1:  # actors sharing a GPU: each takes its share of the memory JAX reserves (75% of it by default)
        env = {"XLA_PYTHON_CLIENT_MEM_FRACTION": f"{0.75 * gpus:.3f}"}
    find = dict(detector=settings["detector"], every=settings["every"], align=settings["align"] is not None, chunk=batch_size)
    blocks = -(-len(units) // batch_size)
    workers = min(workers, blocks)  # more actors than batches would only start and wait
    ds = ray.data.from_items(units, override_num_blocks=blocks)
    if gpus:  # decoding and the detector on the CPUs, in tasks, while the actors keep the GPUs busy
        ds = ds.map_batches(_find_faces, fn_kwargs=find, batch_size=batch_size, batch_format="pyarrow", num_cpus=1)
    ds = ds.map_batches(_Landmarker, fn_constructor_kwargs=dict(landmarker_args, find=None if gpus else find),
                        compute=ray.data.ActorPoolStrategy(size=workers), batch_size=batch_size, batch_format="pyarrow", num_cpus=cpus,
                        num_gpus=gpus, runtime_env={"env_vars": env} if env else None)
    bar = tqdm(total=len(todo), disable=not progress, unit="image", smoothing=0.1)
    with bar:
        for table in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            before = writer.counts["inputs"]
            writer.add(table)
            bar.update(writer.counts["inputs"] - before)
            bar.set_postfix(dict(faces=writer.counts["faces"], errors=writer.counts["errors"],
                                 **({"frames": writer.counts["frames"]} if writer.counts["frames"] else {})), refresh=False)
