"""Landmarks through a video: detect once, then follow each face from its own landmarks.

    for faces in lgcn_jax.track(frames):        # frames: arrays (u8[H, W] or RGB u8[H, W, 3]) or paths
        ...                                     # one list of Face (with .track_id) per frame

The face detector runs on the first frame, then only every ``detect_every`` frames or
when a face is lost; in between, each face's crop is re-cut from its landmarks in the
previous frame, so a moving or rolling face stays framed as the network expects, at the
cost of one network pass per face.  A face whose mean point confidence falls below
``min_confidence`` is dropped (it left the frame or was occluded).

On a detector frame every face found goes through ``detect``'s own passes (detector box,
then a re-cut from those landmarks); one that lies on a tracked face takes over that
track (so detector frames give ``detect``'s landmarks), the others start new tracks.
Between them the crop is centred and rolled by the previous landmarks, with its side
set by their eye distance times the side/eye-distance ratio of the track's last
detector frame.  Re-cutting the side from the landmarks' own extent instead lets the
network's small bias on the jaw line compound from frame to frame (measured: the crop
shrank ~1% a frame on a real photo, 1.2% -> 5.5% inter-ocular error in 25 frames; with
the eye-distance scale it stayed at 1.2-1.7%).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Iterable, Iterator

import numpy as np

from lgcn_jax import crop as crop_lib
from lgcn_jax.detect import Face, detection_map, first_pass_model, landmarks
from lgcn_jax.detectors import FaceDetector, get_detector
from lgcn_jax.image_io import load_gray
from lgcn_jax.landmarks68 import LEFT_EYE, RIGHT_EYE
from lgcn_jax.machine import defaults
from lgcn_jax.predict import Model
from lgcn_jax.release import resolve_model
from lgcn_jax.video import read_frames

__all__ = ["Tracker", "track", "MIN_CONFIDENCE"]

# The default of every min_confidence (Tracker, track, annotate.annotate_video): between the background crops
# and the hardest real face measured with the released weights (Tracker's docstring gives the numbers).
MIN_CONFIDENCE = 0.4
# Tracker._follow keeps a face's crop while the re-cut one differs by at most: this fraction of the side
# in its centre, this relative change of side, these degrees of roll (training augments by 5%, 10%, 15).
DEADBAND = (0.02, 0.02, 1.5)


@dataclasses.dataclass
class Tracker:
    """Frame-by-frame state of ``track``: call ``update(frame)`` for each frame in order.

    Args:
      model: a ``Model`` (``load_model`` / ``load_pretrained``).
      detector: a name from ``lgcn_jax.detectors.DETECTORS`` (default "yunet") or a function gray u8[H, W] -> list of ``Detection``.
      detect_every: frames between detector runs (1: every frame, as ``detect``).
      min_confidence: a face whose mean point confidence (heatmap value at its points) falls
        below this is dropped.  Measured with 300w_paper: 300-W faces >= 0.74 (median 0.79), the
        half-occluded profile of docs/img/detect_group.png 0.49, crops of background <= 0.37, noise
        < 0.01; with 300w_cpu42 (bench/confidence.py: the 554 common faces, corner crops of their
        photos, noise): faces >= 0.53 (median 0.70), corner crops <= 0.43 (one above 0.4; 99% <= 0.37),
        noise <= 0.14; with 300w_cpu48 faces >= 0.45, corner crops <= 0.45 (one holding half a face;
        99% <= 0.33), noise <= 0.10.
      refine: passes re-cut from the landmarks for a newly detected face (as ``detect``; None: this machine's).
      first_pass: the model of those passes but the last (as ``detect``; None: ``model``).
      follow_passes: at most this many passes for a followed face per frame, each on the crop re-cut from the
        last one's landmarks, stopping when the crop is kept (None: ``refine`` + 1).
    """

    model: Model
    detector: str | FaceDetector | None = None
    detect_every: int = 10
    min_confidence: float = MIN_CONFIDENCE
    refine: int | None = None
    follow_passes: int | None = None
    batch_size: int = 32
    first_pass: object = None
    frame_index: int = dataclasses.field(default=-1, init=False)
    faces: list[Face] = dataclasses.field(default_factory=list, init=False)
    _next_id: int = dataclasses.field(default=0, init=False)
    _last_detection: int | None = dataclasses.field(default=None, init=False)
    _lost: bool = dataclasses.field(default=False, init=False)
    _side_per_eyes: dict = dataclasses.field(default_factory=dict, init=False)

    def __post_init__(self):
        if self.detect_every < 1:
            raise ValueError(f"detect_every must be at least 1, got {self.detect_every}")
        if not 0.0 <= self.min_confidence <= 1.0:
            raise ValueError(f"min_confidence is a mean heatmap value in [0, 1], got {self.min_confidence}")
        self.refine = defaults().refine if self.refine is None else self.refine
        if self.refine < 0:
            raise ValueError(f"refine must be >= 0, got {self.refine}")
        self.follow_passes = self.refine + 1 if self.follow_passes is None else self.follow_passes
        self.detector = get_detector(self.detector)
        self.first_pass = first_pass_model(self.first_pass, self.model)

    def update(self, frame) -> list[Face]:
        """The faces of the next frame (u8[H, W], RGB u8[H, W, 3], PIL image or path), each with its ``track_id``."""
        self.frame_index += 1
        gray = load_gray(frame)
        kept: list[Face] = []
        dropped: list[Face] = []
        if self.faces:
            followed = self.faces
            for k in range(self.follow_passes):
                maps = [self._follow(f) for f in followed]
                if k and all(m is f.crop for m, f in zip(maps, followed)):
                    break  # every crop kept: another pass would give the same landmarks
                followed = [dataclasses.replace(n, track_id=o.track_id) for o, n in
                            zip(followed, landmarks(self.model, [gray], [0] * len(maps), maps, [f.score for f in followed], 0, self.batch_size))]
            for old, new in zip(self.faces, followed):
                if float(np.mean(new.confidence)) >= self.min_confidence:
                    kept.append(new)
                else:
                    dropped.append(old)
                    self._lost = True
        due = self._last_detection is None or self.frame_index - self._last_detection >= self.detect_every
        if due or self._lost:
            self._last_detection, self._lost = self.frame_index, False
            kept = self._detect(gray, kept, dropped)
        kept = _unique(kept)
        self.faces = kept
        ids = {f.track_id for f in kept}
        self._side_per_eyes = {k: v for k, v in self._side_per_eyes.items() if k in ids}
        return kept

    def _detect(self, gray: np.ndarray, tracked: list[Face], dropped: list[Face]) -> list[Face]:
        """``tracked`` plus the faces the detector finds elsewhere; a find on a tracked face takes over its track
        where a detection gets more than one pass (with one pass, the crop followed from the landmarks frames
        the face better than the detector's box: the find is left out), and one where a track was just dropped
        in this frame revives that track's id."""
        found = self.detector(gray)
        if self.refine == 0:
            found = [d for d in found if not any(_covers(f, d.center) for f in tracked)]
        maps = [detection_map(self.model, d) for d in found]
        faces = landmarks(self.model, [gray], [0] * len(maps), maps, [d.score for d in found], self.refine, self.batch_size, self.first_pass)
        out = list(tracked)
        for face in sorted(faces, key=lambda f: -float(np.mean(f.confidence))):
            if float(np.mean(face.confidence)) < self.min_confidence:
                continue
            same = [k for k, f in enumerate(out) if _same_face(f, face)]
            if same:
                k = same[0]
                if out[k].track_id in {f.track_id for f in tracked}:  # not yet taken over by a stronger detection
                    tid = out[k].track_id
                    out[k] = dataclasses.replace(face, track_id=tid)
                    self._anchor(out[k])
                    tracked = [f for f in tracked if f.track_id != tid]
                continue
            revived = [f.track_id for f in dropped if _same_face(f, face)]
            if revived:
                dropped = [f for f in dropped if f.track_id != revived[0]]
                out.append(dataclasses.replace(face, track_id=revived[0]))
            else:
                out.append(dataclasses.replace(face, track_id=self._next_id))
                self._next_id += 1
            self._anchor(out[-1])
        return out

    def _anchor(self, face: Face) -> None:
        side = crop_lib.similarity_params(face.crop, self.model.data.image_size)[1]
        self._side_per_eyes[face.track_id] = side / max(_eye_distance(face.landmarks), 1e-6)

    def _follow(self, face: Face) -> np.ndarray:
        """The crop map for a face's next frame, from its landmarks in this one.

        A crop within ``DEADBAND`` of the face's current one is kept as it is: re-cutting after every
        sub-pixel change of the landmarks made them jitter by 1.5-5 px from frame to frame on a still
        face (300w_cpu; 0.8-2.5 px with 300w_paper), as each new framing shifts the network's answer a
        little.  The deadband is far inside the shifts, scales and rotations the network was trained on.
        """
        size = self.model.data.image_size
        framing = crop_lib.from_landmarks(face.landmarks, crop_lib.crop_ratio(self.model.data.dataset), size)
        center, _, angle = crop_lib.similarity_params(framing, size)
        side = self._side_per_eyes[face.track_id] * _eye_distance(face.landmarks)
        old_center, old_side, old_angle = crop_lib.similarity_params(face.crop, size)
        shift, scale, turn = DEADBAND
        if (np.linalg.norm(center - old_center) <= shift * old_side and abs(side / old_side - 1.0) <= scale
                and abs((angle - old_angle + np.pi) % (2 * np.pi) - np.pi) <= np.radians(turn)):
            return face.crop
        return crop_lib.similarity(center, side, angle, size)


def _eye_distance(points: np.ndarray) -> float:
    p = np.asarray(points, np.float64)
    return float(np.linalg.norm(p[LEFT_EYE].mean(0) - p[RIGHT_EYE].mean(0)))


def _centre(face: Face) -> np.ndarray:
    return (face.box[:2] + face.box[2:]) / 2.0


def _covers(face: Face, point: np.ndarray) -> bool:
    """Whether ``point`` lies within half a face size of the face's centre (the same face)."""
    return bool(np.linalg.norm(np.asarray(point) - _centre(face)) < 0.5 * float(np.max(face.box[2:] - face.box[:2])))


def _same_face(a: Face, b: Face) -> bool:
    """Whether either face's centre lies within half the other's size of it."""
    return _covers(a, _centre(b)) or _covers(b, _centre(a))


def _unique(faces: list[Face]) -> list[Face]:
    """Two tracks that converged onto one face: keep the older (lower id)."""
    keep: list[Face] = []
    for f in sorted(faces, key=lambda f: f.track_id):
        if not any(_covers(k, _centre(f)) for k in keep):
            keep.append(f)
    return keep


def track(frames: Iterable, params=None, *, detector: str | FaceDetector | None = None, detect_every: int = 10,
          min_confidence: float = MIN_CONFIDENCE, refine: int | None = None, first_pass=None) -> Iterator[list[Face]]:
    """Landmarks of every face in each of ``frames``, with a ``track_id`` that follows a face across frames.

    Args:
      frames: an iterable of frames (u8[H, W] gray, RGB u8[H, W, 3], PIL images or paths; a
        generator is consumed lazily), or the path of a video file (read frame by frame).
      params: a ``Model``, the name of released weights or a model folder; None: the default model of this
        machine (``release.default_model``).
      detector, detect_every, min_confidence, refine, first_pass: see ``Tracker``.
    Yields:
      per frame, a list of ``Face`` in image pixels, ordered by ``track_id``; [] when none.
    """
    tracker = Tracker(resolve_model(params), detector=detector, detect_every=detect_every, min_confidence=min_confidence, refine=refine,
                      first_pass=first_pass)
    if isinstance(frames, (str, os.PathLike)):  # one path: a video (a string is not a sequence of frames)
        frames = read_frames(os.fspath(frames))
    for frame in frames:
        yield tracker.update(frame)
