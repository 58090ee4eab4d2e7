"""The peer the benchmarks compare with: dlib's HOG face detector and its 68-point shape predictor.

Needs ``pip install "lgcn_jax[peers]"`` (dlib-bin, face-recognition-models)."""

from __future__ import annotations

import numpy as np


class Dlib:
    """dlib's HOG detector (``upsample``: 0 finds faces from about 80 px, 1 from about 40 px at four times the cost) and
    its 68-point predictor: ``landmarks(gray u8[H, W])`` -> one f64[68, 2] per face found, in image pixels."""

    def __init__(self, upsample: int = 1):
        import dlib
        import face_recognition_models

        self.upsample = upsample
        self.detector = dlib.get_frontal_face_detector()
        self.predictor = dlib.shape_predictor(face_recognition_models.pose_predictor_model_location())

    def landmarks(self, gray: np.ndarray) -> list[np.ndarray]:
        gray = np.ascontiguousarray(gray, np.uint8)
        return [np.array([[p.x, p.y] for p in self.predictor(gray, r).parts()], np.float64) for r in self.detector(gray, self.upsample)]
