"""Evaluate on a split: landmarks, the paper's metrics, a JSON report and a CED plot.

One path serves both uses: validation during training decodes by the sub-pixel arg-max of bare
network parameters, ``run_eval.py`` by a ``Model``'s full decoding (``predict_landmarks``).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Union

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from lgcn_jax import input_pipeline, metrics, network
from lgcn_jax.files import atomic_path
from lgcn_jax.heatmaps import argmax_subpixel
from lgcn_jax.metric_writer import read_metrics
from lgcn_jax.postprocess import postprocess
from lgcn_jax.predict import Model, heatmaps, predict
from lgcn_jax.xla_options import jit

__all__ = ["eval_step", "predict_batches", "predict_landmarks", "evaluate", "horizontal_offset", "evaluate_landmarks", "subset_reports",
           "write_report", "plot_ced", "plot_training", "format_table", "NORMS", "THRESHOLD", "tune_decoding", "PEAK_FIT_RADII", "LOCAL_WINDOWS"]

NORMS = ("inter_ocular", "inter_pupil")
THRESHOLD = 0.08


@jit
def eval_step(net: network.LGCNParams, images: jax.Array) -> jax.Array:
    """Landmarks f32[B, L, 2] from images by the per-map sub-pixel maximum (no shape model)."""
    return argmax_subpixel(network.apply(net, images))[0]


def predict_batches(fn, data: dict, batch_size: int = 32, progress: bool = False, max_batches: int = 0) -> np.ndarray:
    """Landmarks f32[N, L, 2] from ``fn(images f32[B, S, S, 1]) -> f32[B, L, 2]`` over the first
    ``max_batches`` batches (0: all) of a split held in memory ({"image": u8[N, S, S, 1], ...})."""
    n = len(data["image"]) if not max_batches else min(len(data["image"]), max_batches * batch_size)
    out = []
    with tqdm(total=n, disable=not progress, unit="face", desc="evaluating", dynamic_ncols=True) as bar:
        for k, batch in enumerate(input_pipeline.eval_batches(data, batch_size)):
            if max_batches and k >= max_batches:
                break
            keep = batch["valid"] > 0
            out.append(np.asarray(fn(batch["image"]))[keep])
            bar.update(int(keep.sum()))
    return np.concatenate(out)


def predict_landmarks(model: Union[Model, network.LGCNParams], data: dict, batch_size: int = 32, progress: bool = False,
                      max_batches: int = 0) -> np.ndarray:
    """Landmarks f32[N, L, 2] for a split held in memory: a ``Model`` decodes as it is set to (network + its
    post-processing), bare ``LGCNParams`` by the sub-pixel arg-max (``eval_step``, as validation does)."""
    if isinstance(model, Model):
        return predict_batches(lambda images: predict(model, images), data, batch_size, progress, max_batches)
    return predict_batches(lambda images: eval_step(model, images), data, batch_size, progress, max_batches)


def evaluate(model: Union[Model, network.LGCNParams], data: dict, batch_size: int = 32, max_batches: int = 0) -> dict:
    """Inter-ocular NME, AUC and failure rate at 0.08 of ``predict_landmarks`` on a split held in memory."""
    pred = predict_landmarks(model, data, batch_size, max_batches=max_batches)
    errors = metrics.nme(pred, data["landmarks"][: len(pred)])
    auc, failure = metrics.auc_and_failure(errors)
    return {"nme": float(errors.mean()), "auc": auc, "failure_rate": failure, "num_faces": int(len(errors))}


def horizontal_offset(model: Model, data: dict, batch_size: int = 32) -> float:
    """The ``postprocess.x_offset`` of ``model``: the mean of ground-truth x minus decoded x (pixels of its crops)
    over labelled faces ``data`` held out of training, decoded as the model decodes but without an offset."""
    pred = predict_landmarks(model.with_postprocess(x_offset=0.0), data, batch_size)
    return float(np.mean(np.asarray(data["landmarks"], np.float64)[..., 0] - pred[..., 0]))


PEAK_FIT_RADII = (1, 4, 5, 6, 7, 8, 9, 10, 11, 12)
# The shape model's rounds of local window fits tried at the chosen radius besides the model's own: one round,
# and none (the global fit alone, which also decodes fastest).
LOCAL_WINDOWS = ((20,), ())


def tune_decoding(model: Model, data: dict, radii=None, batch_size: int = 32, local_windows=None) -> tuple[Model, dict]:
    """``model`` with the decoding that gives the lowest inter-ocular NME on labelled faces ``data`` held out of
    training, and the table {(radius, windows): (x_offset, nme)} of the settings tried: every
    ``postprocess.peak_fit_radius`` of ``radii`` (default ``PEAK_FIT_RADII``) with the model's own local windows,
    then at the best radius the ``postprocess.local_windows`` of ``local_windows`` (default ``LOCAL_WINDOWS``; only
    with the shape model), each setting with its own ``x_offset`` (``horizontal_offset``).  The network runs once;
    every setting decodes its heatmaps."""
    maps = np.concatenate([np.asarray(heatmaps(model.params, jnp.asarray(b["image"]), model.postprocess.flip_test))[b["valid"] > 0]
                           for b in input_pipeline.eval_batches(data, batch_size)])
    gt = np.asarray(data["landmarks"], np.float64)

    def score(radius, windows):
        cfg = dataclasses.replace(model.postprocess, peak_fit_radius=radius, local_windows=windows, x_offset=0.0)
        pred = np.concatenate([np.asarray(postprocess(maps[lo:lo + batch_size], model.shape_model, cfg))
                               for lo in range(0, len(maps), batch_size)]).astype(np.float64)
        offset = float(np.mean(gt[..., 0] - pred[..., 0]))
        pred[..., 0] += offset
        return round(offset, 4), float(metrics.nme(pred, gt).mean())

    own = tuple(model.postprocess.local_windows)
    table = {(r, own): score(r, own) for r in (PEAK_FIT_RADII if radii is None else radii)}
    radius = min(table, key=lambda k: table[k][1])[0]
    if model.postprocess.use_shape_model and model.shape_model is not None:
        for w in LOCAL_WINDOWS if local_windows is None else local_windows:
            if tuple(w) != own:
                table[(radius, tuple(w))] = score(radius, tuple(w))
    best = min(table, key=lambda k: table[k][1])
    return model.with_postprocess(peak_fit_radius=best[0], local_windows=best[1], x_offset=table[best][0]), table


def evaluate_landmarks(pred: np.ndarray, gt: np.ndarray, threshold: float = THRESHOLD) -> dict:
    """NME, AUC and failure rate at ``threshold`` for both normalisations, with per-image errors."""
    report = {}
    for norm in NORMS:
        errors = metrics.nme(pred, gt, norm)
        auc, failure = metrics.auc_and_failure(errors, threshold)
        report[norm] = {"nme": float(errors.mean()), f"auc@{threshold}": auc, f"failure@{threshold}": failure, "per_image": errors.tolist()}
    return report


def subset_reports(pred: np.ndarray, gt: np.ndarray, file_names, threshold: float = THRESHOLD) -> dict:
    """``evaluate_landmarks`` per source dataset (first folder of each file name, e.g. helen, lfpw), without
    per-image lists; {} when the split comes from one dataset only."""
    groups = np.array([str(f).split("/")[0] for f in file_names])
    if len(set(groups)) < 2:
        return {}
    out = {}
    for g in sorted(set(groups)):
        sel = groups == g
        rep = evaluate_landmarks(pred[sel], gt[sel], threshold)
        for norm in NORMS:
            rep[norm].pop("per_image")
        out[g] = {"num_faces": int(sel.sum()), **rep}
    return out


def write_report(report: dict, path: str) -> str:
    """Write the report as JSON (atomically: an interrupted run leaves the previous file intact)."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(report, f, indent=1)
    return path


def _save_figure(fig, ax, path: str, title: str) -> str:
    """Title, lay out and write a figure as PNG (atomically: an interrupted run keeps the previous file)."""
    if title:
        ax.set_title(title)
    fig.tight_layout()
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp)
    return path


def plot_ced(curves: dict[str, np.ndarray], path: str, title: str = "", threshold: float = THRESHOLD) -> str:
    """Save cumulative error distribution curves (label -> per-image errors) as a PNG."""
    fig = Figure(figsize=(5, 4), dpi=120)  # no pyplot: the user's matplotlib backend is left alone
    ax = fig.subplots()
    for label, errors in curves.items():
        x, y = metrics.ced_curve(errors, threshold)
        auc, failure = metrics.auc_and_failure(errors, threshold)
        ax.plot(x, y, label=f"{label}: AUC {auc:.3f}, fail {100 * failure:.1f}%")
    ax.set_xlim(0, threshold)
    ax.set_ylim(0, 1)
    ax.set_xlabel("NME")
    ax.set_ylabel("fraction of faces")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return _save_figure(fig, ax, path, title)


def plot_training(workdir: str, path: str, title: str = "") -> str:
    """Save the training curve of a run (loss and validation NME by step, from ``metrics.jsonl``) as a PNG."""
    records = read_metrics(workdir)
    loss = [(r["step"], r["train/loss"]) for r in records if isinstance(r.get("train/loss"), float)]
    val = [(r["step"], r["val/nme"]) for r in records if isinstance(r.get("val/nme"), float)]
    fig = Figure(figsize=(6, 3.5), dpi=120)
    ax = fig.subplots()
    if loss:
        ax.plot(*zip(*loss), color="tab:blue", lw=0.8, label="training loss")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss", color="tab:blue")
    ax.set_yscale("log")
    ax2 = ax.twinx()
    if val:
        ax2.plot(*zip(*val), "o-", color="tab:red", ms=3, label="validation NME (arg-max)")
    ax2.set_ylabel("validation NME, inter-ocular", color="tab:red")
    ax2.set_ylim(0, max([v for _, v in val[1:]] or [0.2]) * 1.1)
    ax.grid(alpha=0.3)
    return _save_figure(fig, ax, path, title)


def format_table(reports: dict[str, dict], threshold: float = THRESHOLD) -> str:
    """A small table like the paper's: one row per split and normalisation, NME and failures in %."""
    lines = [f"{'split':<13}{'norm':<14}{'NME %':>8}{'AUC@' + str(threshold):>10}{'fail %':>8}{'faces':>7}"]
    for split, rep in reports.items():
        for norm in NORMS:
            r = rep[norm]
            lines.append(f"{split:<13}{norm:<14}{100 * r['nme']:>8.2f}{r[f'auc@{threshold}']:>10.4f}"
                         f"{100 * r[f'failure@{threshold}']:>8.2f}{rep['num_faces']:>7}")
    return "\n".join(lines)
