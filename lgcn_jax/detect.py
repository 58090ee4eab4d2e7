"""68 landmarks for every face in a photo, in its own pixel coordinates.

    faces = lgcn_jax.detect("group.jpg")            # [Face(box, landmarks f32[68, 2], confidence f32[68], ...)]

Pipeline: grayscale (any mode, EXIF orientation applied, so coordinates are those of the image as
viewers show it) -> face boxes and rolls from a face detector (``lgcn_jax.detectors``; default YuNet,
whose weights ship in the package), run on a reduced copy -> one square crop per face, cut from the
full image and framed like the training crops of the model's dataset (``crop.crop_ratio``) ->
``predict`` on all crops of all images as one batch -> ``refine`` more passes on crops re-cut from
the landmarks (``crop.from_landmarks``: centred on their box, rolled upright by the eye line) ->
landmarks mapped back through each crop's affine map.  The passes before the last only frame the
next crop, so a smaller network may run them (``first_pass``).

Videos: ``lgcn_jax.track``.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from lgcn_jax import crop as crop_lib
from lgcn_jax.detectors import Detection, FaceDetector, get_detector
from lgcn_jax.image_io import load_gray
from lgcn_jax.machine import defaults
from lgcn_jax.predict import Model, predict_with_confidence
from lgcn_jax.release import resolve_model
from lgcn_jax.sharding import pad_rows

__all__ = ["Face", "Detection", "detect", "detect_batch", "first_pass_model", "detection_map", "detected_landmarks", "landmarks"]


@dataclasses.dataclass(frozen=True)
class Face:
    """One face: ``box`` f32[4] (x0, y0, x1, y1) is the bounding box of the landmarks in
    image pixels; ``landmarks`` f32[68, 2] (x, y), 0-indexed pixel centres; ``confidence``
    f32[68] the heatmap value at each point (about 1 when sure, near 0 when the point was
    placed by the shape model); ``angle`` the face's roll in radians; ``score`` the face
    detector's score; ``crop`` f64[2, 3] the affine map from crop pixels to image pixels;
    ``track_id`` the face's identity across the frames of ``track`` (None from ``detect``);
    ``model`` the name of the weights that placed the landmarks (``Model.name``).
    """

    box: np.ndarray
    landmarks: np.ndarray
    confidence: np.ndarray
    angle: float
    score: float
    crop: np.ndarray
    track_id: int | None = None
    model: str = ""

    def to_dict(self) -> dict:
        d = {"box": [round(float(v), 2) for v in self.box], "landmarks": np.round(self.landmarks, 2).tolist(),
             "confidence": np.round(self.confidence, 3).tolist(), "angle_deg": round(float(np.degrees(self.angle)), 2),
             "score": float(self.score)}
        if self.track_id is not None:
            d["track_id"] = self.track_id
        return d


def _run(model: Model, crops: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    lms, confs = [], []
    for lo in range(0, len(crops), batch_size):
        chunk = crops[lo:lo + batch_size]
        # Pad to a power of two (at most batch_size): a handful of compiled shapes serve any face count.
        x = pad_rows(chunk, min(batch_size, 1 << (len(chunk) - 1).bit_length()))
        lm, conf = predict_with_confidence(model, x[..., None])
        lms.append(np.asarray(lm)[: len(chunk)])
        confs.append(np.asarray(conf)[: len(chunk)])
    return np.concatenate(lms), np.concatenate(confs)


def first_pass_model(first_pass, model: Model) -> Model:
    """``first_pass`` of ``detect`` as a ``Model``: None is ``model`` itself; a name is released weights, a folder
    saved weights (``release.resolve_model``).  It must mark the same landmarks as ``model``."""
    if first_pass is None:
        return model
    first_pass = resolve_model(first_pass, "first_pass")
    n, k = first_pass.params.config.num_landmarks, model.params.config.num_landmarks
    if n != k:
        raise ValueError(f"first_pass marks {n} landmarks and the model {k}: its landmarks frame the model's crops, "
                         "so both must mark the same points (the 68-point iBUG layout)")
    crop_lib.crop_ratio(first_pass.data.dataset)  # a framing must be known for its dataset
    return first_pass


def detect_batch(images: Sequence, params=None, *, detector: str | FaceDetector | None = None,
                 refine: int | None = None, batch_size: int = 32, first_pass=None) -> list[list[Face]]:
    """``detect`` for many images: every face of every image goes through the network in shared batches."""
    model = resolve_model(params)
    refine = defaults().refine if refine is None else refine
    first_pass = first_pass_model(first_pass, model)
    detector = get_detector(detector)
    grays = [load_gray(im, exif="apply") for im in images]
    return detected_landmarks(model, grays, [detector(g) for g in grays], refine, batch_size, first_pass)


def detection_map(model: Model, detection: Detection) -> np.ndarray:
    """The first crop map f64[2, 3] of a face the detector found, framed for ``model``."""
    ratio = crop_lib.crop_ratio(model.data.dataset)
    return crop_lib.similarity(detection.center, detection.size * ratio, detection.angle, model.data.image_size)


def detected_landmarks(model: Model, grays: Sequence[np.ndarray], detections: Sequence[Sequence[Detection]], refine: int = 1,
                       batch_size: int = 32, first_pass: Model | None = None) -> list[list[Face]]:
    """``landmarks`` of the faces ``detections[i]`` found in image ``grays[i]`` u8[H, W], all images' faces in shared
    batches; one list per image, its faces left to right."""
    owners = [i for i, found in enumerate(detections) for _ in found]
    found = [d for image_found in detections for d in image_found]
    faces = landmarks(model, grays, owners, [detection_map(model, d) for d in found], [d.score for d in found], refine, batch_size,
                      first_pass)
    results: list[list[Face]] = [[] for _ in grays]
    for o, face in zip(owners, faces):
        results[o].append(face)
    for image_faces in results:
        image_faces.sort(key=lambda f: (float(f.box[0]), float(f.box[1])))
    return results


def landmarks(model: Model, grays: Sequence[np.ndarray], owners: Sequence[int], maps: Sequence[np.ndarray], scores: Sequence[float],
              refine: int = 1, batch_size: int = 32, first_pass: Model | None = None) -> list[Face]:
    """One ``Face`` per crop map: crop ``maps[k]`` f64[2, 3] (framed for ``model``) of image ``grays[owners[k]]`` goes
    through the network in shared batches, then ``refine`` more passes on crops re-cut from the landmarks
    (``crop.from_landmarks``).  ``first_pass`` (a ``Model``; None: ``model``) runs every pass but the last, on the
    same crops framed for it (``crop.reframe``)."""
    if refine < 0:
        raise ValueError(f"refine must be >= 0 (passes re-cut from the landmarks), got {refine}")
    if not owners:
        return []
    size = model.data.image_size
    ratio = crop_lib.crop_ratio(model.data.dataset)
    first_pass = model if first_pass is None else first_pass
    maps = list(maps)
    for it in range(refine + 1):
        net = model if it == refine else first_pass
        net_size = net.data.image_size
        run_maps = maps if net is model else [crop_lib.reframe(m, size, ratio, net_size, crop_lib.crop_ratio(net.data.dataset))
                                              for m in maps]
        crops = np.stack([crop_lib.warp(grays[o], m, net_size) for o, m in zip(owners, run_maps)])
        if it < refine and net.postprocess.flip_test:
            net = net.with_postprocess(flip_test=False)  # a pass that only frames the next crop: not worth twice the time
        lm_crop, conf = _run(net, crops, batch_size)
        points = [crop_lib.apply_affine(m, p) for m, p in zip(run_maps, lm_crop)]
        if it < refine:
            maps = [crop_lib.from_landmarks(p, ratio, size) for p in points]
    return [Face(box=np.concatenate([p.min(0), p.max(0)]).astype(np.float32), landmarks=p, confidence=c.astype(np.float32),
                 angle=crop_lib.similarity_params(m, size)[2], score=float(s), crop=m, model=model.name)
            for m, p, c, s in zip(maps, points, conf, scores)]


def detect(image, params=None, *, detector: str | FaceDetector | None = None, refine: int | None = None,
           first_pass=None) -> list[Face]:
    """Landmarks of every face in ``image`` (a path, PIL image or array of any size and mode).

    Arguments left at None take this machine's defaults (``lgcn_jax.machine``: fast on a CPU, accurate on
    a GPU or TPU).

    Args:
      params: a ``Model`` (``lgcn_jax.load_model(path)``), the name of released weights or a model folder;
        None: this machine's default weights.
      detector: a name from ``lgcn_jax.detectors.DETECTORS`` ("yunet", "yunet-fast", "yunet-jax", "haar",
        "dlib") or any function gray u8[H, W] -> list of ``Detection``; None: this machine's.
      refine: passes re-cut from the previous landmarks (0: one pass, on the detector's framing); None: this
        machine's.
      first_pass: the model of every pass but the last, whose landmarks only frame the next crop: a
        ``Model``, the name of released weights or a checkpoint folder; None: ``params`` itself.
    Returns:
      one ``Face`` per face found, left to right; [] when there is none.
    """
    return detect_batch([image], params, detector=detector, refine=refine, first_pass=first_pass)[0]
