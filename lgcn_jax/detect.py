"""68 landmarks for every face in a photo, in its own pixel coordinates.

    faces = lgcn_jax.detect("group.jpg")            # [Face(box, landmarks f32[68, 2], confidence f32[68], ...)]
    python -m lgcn_jax.detect photo1.jpg photo2.png --out results/

Pipeline: grayscale (any mode, EXIF orientation applied, so coordinates are those
of the image as viewers show it) -> face boxes and rolls from a face detector
(``lgcn_jax.detectors``; default YuNet, whose weights ship in the package; nothing is
downloaded), run on a copy of at most 1920 pixels -> one square crop per face, cut from
the full image and framed like the training crops of the model's dataset
(``crop.crop_ratio``) -> ``predict`` on all crops of all images as one batch -> a second
pass on crops re-cut from the first landmarks (``crop.from_landmarks``: centred on their
box, rolled upright by the eye line, the training framing) -> landmarks mapped back
through each crop's affine map.  The first pass only frames the second one's crop, so a
smaller network may run it (``first_pass="300w_cpu"``: on a CPU nearly half the time of two
passes of the default weights, for 0.01 points of NME on 300-W photos; ``detect``'s docstring).

Videos: ``lgcn_jax.track`` and ``lgcn-detect clip.mp4 --out DIR`` (``lgcn_jax.video``).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import numpy as np

from lgcn_jax import crop as crop_lib
from lgcn_jax.detectors import Detection, FaceDetector, HaarDetector, YuNetDetector, get_detector
from lgcn_jax.image_io import load_gray, open_image
from lgcn_jax.sharding import pad_rows

__all__ = ["Face", "Detection", "HaarDetector", "YuNetDetector", "detect", "detect_batch", "first_pass_model", "landmarks", "draw", "main"]


@dataclasses.dataclass(frozen=True)
class Face:
    """One face: ``box`` f32[4] (x0, y0, x1, y1) is the bounding box of the landmarks in
    image pixels; ``landmarks`` f32[68, 2] (x, y), 0-indexed pixel centres; ``confidence``
    f32[68] the heatmap value at each point (about 1 when sure, near 0 when the point was
    placed by the shape model); ``angle`` the face's roll in radians; ``score`` the face
    detector's score; ``crop`` f64[2, 3] the affine map from crop pixels to image pixels;
    ``track_id`` the face's identity across the frames of ``track`` (None from ``detect``).
    """

    box: np.ndarray
    landmarks: np.ndarray
    confidence: np.ndarray
    angle: float
    score: float
    crop: np.ndarray
    track_id: int | None = None

    def to_dict(self) -> dict:
        d = {"box": [round(float(v), 2) for v in self.box], "landmarks": np.round(self.landmarks, 2).tolist(),
             "confidence": np.round(self.confidence, 3).tolist(), "angle_deg": round(float(np.degrees(self.angle)), 2),
             "score": float(self.score)}
        if self.track_id is not None:
            d["track_id"] = self.track_id
        return d


def _run(model, crops: np.ndarray, batch_size: int):
    from lgcn_jax.predict import predict_with_confidence

    lms, confs = [], []
    for lo in range(0, len(crops), batch_size):
        chunk = crops[lo:lo + batch_size]
        # Pad to a power of two (at most batch_size): a handful of compiled shapes serve any face count.
        x = pad_rows(chunk, min(batch_size, 1 << (len(chunk) - 1).bit_length()))
        lm, conf = predict_with_confidence(model, x[..., None])
        lms.append(np.asarray(lm)[: len(chunk)])
        confs.append(np.asarray(conf)[: len(chunk)])
    return np.concatenate(lms), np.concatenate(confs)


def first_pass_model(first_pass, model):
    """``first_pass`` of ``detect`` as a ``Model``: None is ``model`` itself; a name is released weights
    (``load_pretrained``), a folder saved weights (``load_model``).  It must mark the same landmarks as ``model``."""
    from lgcn_jax.predict import Model, checkpoint_path, load_model, load_pretrained

    if first_pass is None:
        return model
    if isinstance(first_pass, (str, os.PathLike)):
        spec = os.fspath(first_pass)
        path = checkpoint_path(spec)  # an unknown name: a CheckpointError listing the released ones
        first_pass = load_model(path) if path == spec else load_pretrained(spec)
    if not isinstance(first_pass, Model):
        raise TypeError("first_pass must be a lgcn_jax.Model, the name of released weights (e.g. '300w_cpu') or a "
                        f"checkpoint folder, or None for the model itself; got {type(first_pass).__name__}")
    n, k = first_pass.config.model.num_landmarks, model.config.model.num_landmarks
    if n != k:
        raise ValueError(f"first_pass marks {n} landmarks and the model {k}: its landmarks frame the model's crops, "
                         "so both must mark the same points (the 68-point iBUG layout)")
    crop_lib.crop_ratio(first_pass.config.data.dataset)  # a framing must be known for its dataset
    return first_pass


def detect_batch(images: Sequence, params=None, *, detector: str | FaceDetector | None = None,
                 refine: int = 1, batch_size: int = 32, first_pass=None) -> list[list[Face]]:
    """``detect`` for many images: every face of every image goes through the network in shared batches."""
    from lgcn_jax.predict import Model, load_pretrained

    model = load_pretrained() if params is None else params
    if not isinstance(model, Model):
        raise TypeError("params must be a lgcn_jax.Model (from load_model / load_pretrained), or None for the released weights")
    first_pass = first_pass_model(first_pass, model)
    size = model.config.data.image_size
    ratio = crop_lib.crop_ratio(model.config.data.dataset)
    detector = get_detector(detector)
    grays = [load_gray(im, exif="apply") for im in images]
    owners, maps, scores = [], [], []
    for i, g in enumerate(grays):
        for d in detector(g):
            owners.append(i)
            maps.append(crop_lib.similarity(d.center, d.size * ratio, d.angle, size))
            scores.append(d.score)
    results: list[list[Face]] = [[] for _ in grays]
    for o, face in zip(owners, landmarks(model, grays, owners, maps, scores, refine, batch_size, first_pass)):
        results[o].append(face)
    for faces in results:
        faces.sort(key=lambda f: (float(f.box[0]), float(f.box[1])))
    return results


def landmarks(model, grays: Sequence[np.ndarray], owners: Sequence[int], maps: Sequence[np.ndarray], scores: Sequence[float],
              refine: int = 1, batch_size: int = 32, first_pass=None) -> list[Face]:
    """One ``Face`` per crop map: crop ``maps[k]`` f64[2, 3] (framed for ``model``) of image ``grays[owners[k]]`` goes
    through the network in shared batches, then ``refine`` more passes on crops re-cut from the landmarks
    (``crop.from_landmarks``).  ``first_pass`` (a ``Model``; None: ``model``) runs every pass but the last, on the
    same crops framed for it (``crop.reframe``)."""
    if refine < 0:
        raise ValueError(f"refine must be >= 0 (passes re-cut from the landmarks), got {refine}")
    if not owners:
        return []
    size = model.config.data.image_size
    ratio = crop_lib.crop_ratio(model.config.data.dataset)
    first_pass = model if first_pass is None else first_pass
    maps = list(maps)
    for it in range(refine + 1):
        net = model if it == refine else first_pass
        net_size = net.config.data.image_size
        run_maps = maps if net is model else [crop_lib.reframe(m, size, ratio, net_size, crop_lib.crop_ratio(net.config.data.dataset))
                                              for m in maps]
        crops = np.stack([crop_lib.warp(grays[o], m, net_size) for o, m in zip(owners, run_maps)])
        if it < refine and net.config.postprocess.flip_test:
            net = net.with_postprocess(flip_test=False)  # a pass that only frames the next crop: not worth twice the time
        lm_crop, conf = _run(net, crops, batch_size)
        points = [crop_lib.apply_affine(m, p) for m, p in zip(run_maps, lm_crop)]
        if it < refine:
            maps = [crop_lib.from_landmarks(p, ratio, size) for p in points]
    return [Face(box=np.concatenate([p.min(0), p.max(0)]).astype(np.float32), landmarks=p, confidence=c.astype(np.float32),
                 angle=crop_lib.similarity_params(m, size)[2], score=float(s), crop=m) for m, p, c, s in zip(maps, points, conf, scores)]


def detect(image, params=None, *, detector: str | FaceDetector | None = None, refine: int = 1, first_pass=None) -> list[Face]:
    """Landmarks of every face in ``image`` (a path, PIL image or array of any size and mode).

    Args:
      params: a ``Model`` (``lgcn_jax.load_model(path)``); None loads the released weights
        (``load_pretrained``: trained on 300-W, see its docstring).
      detector: a name from ``lgcn_jax.detectors.DETECTORS`` ("yunet", the default; "yunet-jax", "haar",
        "dlib") or any function gray u8[H, W] -> list of ``Detection``.
      refine: passes re-cut from the previous landmarks (0: trust the detector's box).
      first_pass: the model of every pass but the last, whose landmarks only frame the next crop: a
        ``Model``, the name of released weights or a checkpoint folder; None: ``params`` itself.  With the
        default weights, ``first_pass="300w_cpu"`` took 696 instead of 1213 ms for a 640x480 photo of one
        face on a 2-core CPU, and gave an NME of 3.31% instead of 3.30% on the 554 common-subset photos of
        300-W (README, "End to end on real photos").
    Returns:
      one ``Face`` per face found, left to right; [] when there is none.
    """
    return detect_batch([image], params, detector=detector, refine=refine, first_pass=first_pass)[0]


def _rgb(image):
    from PIL import Image, ImageOps

    if isinstance(image, (str, os.PathLike)):
        image = open_image(str(image))
    if isinstance(image, Image.Image):
        image = ImageOps.exif_transpose(image)
        if image.mode in ("RGB", "RGBA", "P", "CMYK", "YCbCr", "L", "LA", "1"):
            return image.convert("RGB")
        return Image.fromarray(load_gray(image, exif="stored")).convert("RGB")
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[-1] in (3, 4) and a.dtype == np.uint8:
        return Image.fromarray(np.ascontiguousarray(a[..., :3]))
    return Image.fromarray(load_gray(a)).convert("RGB")


def draw(image, faces: Sequence[Face], radius: float | None = None):
    """An RGB PIL image with every face's box and landmarks (green = confident, red = placed by the model)."""
    from PIL import ImageDraw

    im = _rgb(image)
    d = ImageDraw.Draw(im)
    for f in faces:
        r = radius or max(1.5, float(f.box[2] - f.box[0]) / 60)
        d.rectangle([float(v) for v in f.box], outline=(255, 200, 0), width=max(1, int(r / 1.5)))
        for (x, y), c in zip(f.landmarks, f.confidence):
            c = float(np.clip(c, 0, 1))
            d.ellipse([x - r, y - r, x + r, y + r], fill=(int(255 * (1 - c)), int(255 * c), 60))
    return im


def enable_compilation_cache(path: str | None = None) -> str | None:
    """Keep XLA's compiled programs on disk (JAX's persistent cache), so that a later run skips compiling the
    network (lgcn-detect on one photo, 2 CPU cores: 8.0 s -> 4.9 s).  A cache folder the user set
    (``$JAX_COMPILATION_CACHE_DIR`` or ``jax_compilation_cache_dir``) is kept; else ``path``, by default
    ``$XDG_CACHE_HOME/lgcn_jax/xla`` (``~/.cache/lgcn_jax/xla``).  Returns the folder in use."""
    import jax

    if jax.config.jax_compilation_cache_dir:
        return jax.config.jax_compilation_cache_dir
    path = path or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lgcn_jax", "xla")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return None  # a read-only home: run without the cache
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return path


def main(argv=None) -> int:
    """lgcn-detect IMAGE_OR_VIDEO... --out DIR: per image a JSON and an annotated PNG; per video JSON lines and an annotated mp4."""
    import argparse
    import json
    import sys

    from tqdm.auto import tqdm

    p = argparse.ArgumentParser(prog="lgcn-detect", description="68 facial landmarks for every face in each image or video.")
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_VIDEO",
                   help="photos (any format Pillow reads) and videos (.mp4, .avi, .mov, .mkv, .m4v, .webm; faces tracked from frame to frame)")
    p.add_argument("--out", required=True, help="folder for NAME.json and NAME_landmarks.png (videos: NAME.jsonl and NAME_landmarks.mp4)")
    p.add_argument("--detector", default="yunet", help="face detector: yunet (default), yunet-jax, haar, dlib (lgcn_jax.detectors.DETECTORS)")
    p.add_argument("--detect_every", type=int, default=10, help="videos: frames between face detector runs (it also runs when a face is lost)")
    p.add_argument("--checkpoint", help="a checkpoint folder, or the name of released weights such as 300w_cpu (the small network, "
                                        "fast on a CPU); default: 300w_paper (lgcn_jax.load_pretrained)")
    p.add_argument("--first_pass", help="weights for the first of the two passes, which only frames the second one's crop: "
                                        "e.g. 300w_cpu, nearly halving the time on a CPU (default: the --checkpoint model)")
    p.add_argument("--flip_test", action="store_true", help="also run the final pass on each mirrored face and average the heatmaps "
                   "(postprocess.flip_test: more accurate, the network's time x1.5 for images)")
    p.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    p.add_argument("--no_progress", action="store_true")
    p.add_argument("--no_cache", action="store_true",
                   help="do not keep compiled programs between runs (default: in ~/.cache/lgcn_jax/xla, or $JAX_COMPILATION_CACHE_DIR)")
    args = p.parse_args(argv)
    if args.detect_every < 1:
        p.error(f"--detect_every must be at least 1, got {args.detect_every}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        p.error(f"--out {args.out} is a file; results go to a folder")
    if not args.no_cache:
        enable_compilation_cache()
    from lgcn_jax.checkpoint import CheckpointError
    from lgcn_jax.image_io import ImageError
    from lgcn_jax.predict import checkpoint_path, load_model
    from lgcn_jax.shape_model import ShapeModelError

    try:
        model = load_model(checkpoint_path(args.checkpoint))
        if args.flip_test:
            model = model.with_postprocess(flip_test=True)
        first_pass = first_pass_model(args.first_pass, model)
        detector = get_detector(args.detector)
    except (CheckpointError, ShapeModelError, ValueError, ImportError) as e:
        print(f"lgcn-detect: error: {e}", file=sys.stderr)
        return 1
    os.makedirs(args.out, exist_ok=True)
    names, taken = [], set()
    for path in args.images:
        # a.jpg, a.png and a_2.jpg: a, a_2, a_2_2 (no name is given twice)
        name = stem = os.path.splitext(os.path.basename(path))[0]
        k = 1
        while name in taken:
            k += 1
            name = f"{stem}_{k}"
        taken.add(name)
        names.append(name)
    from lgcn_jax.video import VideoError, annotate_video, is_video

    if not args.overwrite:
        clash = [n for n, path in zip(names, args.images) if os.path.exists(os.path.join(args.out, n + (".jsonl" if is_video(path) else ".json")))]
        if clash:
            print(f"lgcn-detect: error: {args.out} already holds results for {', '.join(clash[:5])}; nothing was written. "
                  "Use another --out or --overwrite.", file=sys.stderr)
            return 1
    failed = 0
    images = [(path, name) for path, name in zip(args.images, names) if not is_video(path)]
    for path, name in zip(args.images, names):
        if not is_video(path):
            continue
        try:
            summary = annotate_video(path, args.out, model, name, detector=detector, detect_every=args.detect_every,
                                     progress=not args.no_progress, first_pass=first_pass)
        except VideoError as e:
            print(f"lgcn-detect: {e}", file=sys.stderr)
            failed += 1
            continue
        print(f"{path}: {summary['frames']} frames, {summary['faces']} face(s) in all, {summary['fps']:.1f} frames/s")
    for path, name in tqdm(images, disable=args.no_progress or not images, unit="image"):
        try:
            image = open_image(path)  # decoded once for detection and drawing
            faces = detect(image, model, detector=detector, first_pass=first_pass)
        except ImageError as e:
            print(f"lgcn-detect: skipped {path}: {e}", file=sys.stderr)
            failed += 1
            continue
        with open(os.path.join(args.out, name + ".json"), "w") as f:
            json.dump({"image": os.path.abspath(path), "faces": [face.to_dict() for face in faces]}, f, indent=1)
        draw(image, faces).save(os.path.join(args.out, name + "_landmarks.png"))
        print(f"{path}: {len(faces)} face(s)")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
