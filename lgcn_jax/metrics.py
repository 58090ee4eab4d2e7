"""300-W metrics: NME (inter-ocular / inter-pupil), failure rate, AUC, CED.

Inter-ocular: the distance of the outer eye corners (points 36 and 45, 0-based); inter-pupil: of
the means of the eye contours 36-41 and 42-47 (lgcn_jax.landmarks68).
"""

from __future__ import annotations

import numpy as np

from lgcn_jax.landmarks68 import LEFT_EYE, NUM_POINTS, OUTER_EYE_CORNERS, RIGHT_EYE

__all__ = ["normaliser", "nme", "ced_curve", "auc_and_failure", "match_face"]


def normaliser(gt: np.ndarray, norm: str = "inter_ocular") -> np.ndarray:
    """Per-face normalising distance of f[N, 68, 2] ground truth -> f[N]."""
    gt = np.asarray(gt, np.float64)
    if gt.ndim != 3 or gt.shape[1:] != (NUM_POINTS, 2):
        raise ValueError(f"ground truth must have shape [N, {NUM_POINTS}, 2], got {gt.shape}")
    if norm == "inter_ocular":
        a, b = gt[:, OUTER_EYE_CORNERS[0]], gt[:, OUTER_EYE_CORNERS[1]]
    elif norm == "inter_pupil":
        a, b = gt[:, RIGHT_EYE].mean(1), gt[:, LEFT_EYE].mean(1)
    else:
        raise ValueError(f"norm must be 'inter_ocular' or 'inter_pupil', got {norm!r}")
    return np.linalg.norm(a - b, axis=-1)


def nme(pred: np.ndarray, gt: np.ndarray, norm: str = "inter_ocular") -> np.ndarray:
    """Mean point-to-point error divided by the normalising distance, per face: f[N]."""
    pred, gt = np.asarray(pred, np.float64), np.asarray(gt, np.float64)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground truth {gt.shape}")
    d = normaliser(gt, norm)
    return np.linalg.norm(pred - gt, axis=-1).mean(-1) / d


def ced_curve(errors: np.ndarray, threshold: float = 0.08, num: int = 1001) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative error distribution: x f[num] in [0, threshold], y = fraction of faces with error <= x."""
    errors = np.sort(np.asarray(errors, np.float64))
    x = np.linspace(0.0, threshold, num)
    y = np.searchsorted(errors, x, side="right") / max(len(errors), 1)
    return x, y


def auc_and_failure(errors: np.ndarray, threshold: float = 0.08) -> tuple[float, float]:
    """Area under the CED up to ``threshold`` (normalised to [0, 1]) and failure rate (error > threshold).

    The area is exact: the CED is a step function, so the area is the mean over
    faces of max(0, threshold - error), divided by the threshold.
    """
    errors = np.asarray(errors, np.float64)
    if errors.size == 0:
        raise ValueError("no errors given")
    auc = float(np.mean(np.clip(threshold - errors, 0.0, None)) / threshold)
    failure = float(np.mean(errors > threshold))
    return auc, failure


def match_face(candidates, truth: np.ndarray, max_offset: float = 0.3) -> int | None:
    """Which of the landmark sets ``candidates`` (each f[68, 2], e.g. the faces ``detect`` found in a photo) is the
    annotated face ``truth`` f[68, 2]: the one whose landmark-box centre is nearest the truth's, if within
    ``max_offset`` times the truth's longer box side; None when no candidate is.  End-to-end evaluation counts an
    unmatched face as missed."""
    truth = np.asarray(truth, np.float64)
    lo, hi = truth.min(0), truth.max(0)
    centre, size = (lo + hi) / 2, float((hi - lo).max())
    offsets = [np.linalg.norm((np.min(p, 0) + np.max(p, 0)) / 2 - centre) for p in candidates]
    if not offsets or min(offsets) > max_offset * size:
        return None
    return int(np.argmin(offsets))
