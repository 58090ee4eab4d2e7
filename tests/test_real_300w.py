"""Real 300-W faces (``--real-300w DIR``, default ../shared/data/300w_partial; skipped where absent): the partial
build, the holdout, and the released weights on the common subset, as `run_eval.py --split common` reports them."""

import dataclasses
import glob
import json
import os

import numpy as np
import pytest

import lgcn_jax
from data_prep import build_300w, export_arrays
from data_prep.layout_300w import read_pts
from lgcn_jax import crop as crop_lib
from lgcn_jax import datasets, evaluation, metrics, train
from lgcn_jax.cli import eval as cli_eval
from lgcn_jax.config import DataConfig
from lgcn_jax.detect import landmarks
from lgcn_jax.image_io import load_gray
from lgcn_jax.release import PRETRAINED
from tests.conftest import ROOT

COMMON = ("helen/testset", "lfpw/testset")


@pytest.fixture(scope="module")
def built(tmp_path_factory, real_300w):
    """The real partial 300-W, built once and exported to arrays (the export is what the GPU machine reads)."""
    data_dir = str(tmp_path_factory.mktemp("tfds_real"))
    assert build_300w.main(["--manual_dir", real_300w, "--data_dir", data_dir, "--workers", "2"]) == 0
    export = str(tmp_path_factory.mktemp("export_real"))
    assert export_arrays.main(["--dataset", "300w", "--data_dir", data_dir, "--out", export]) == 0
    return data_dir, export


def test_partial_build_has_train_and_common(built, capsys):
    data_dir, export = built
    for d in (data_dir, export):
        cfg = DataConfig(dataset="300w", data_dir=d)
        assert datasets.available_splits(cfg) == ["common", "train"]
    common = datasets.load_split(DataConfig(dataset="300w", data_dir=export), "common")
    assert common["image"].shape == (554, 96, 96, 1)
    folders = [f.split("/")[0] for f in common["file_name"]]
    assert folders.count("helen") == 330 and folders.count("lfpw") == 224


def test_holdout_of_real_train(built):
    train = datasets.load_split(DataConfig(dataset="300w", data_dir=built[1]), "train")
    fit, val = datasets.holdout(train, 200)
    assert len(fit["image"]) == 1813 and len(val["image"]) == 199
    assert not set(map(datasets.photo_id, fit["file_name"])) & set(map(datasets.photo_id, val["file_name"]))


# The default-weights test evaluates the first faces of each subset of common by file name (the paper
# network takes about a second per face on 2 CPU cores, so not all 554); their mean inter-ocular and
# inter-pupil NME in the release's evaluation of all 554 (checkpoints/README.md: 3.26% and 4.52% there).
SUBSET_FACES = 16
SUBSET_NME = (0.03189, 0.04422)


def test_released_default_weights_on_the_common_subset(built, tmp_path, monkeypatch, capsys):
    """`run_eval.py --split common` with no checkpoint: the released 300w_paper weights, reports in ./eval,
    nothing in checkpoints/; on 16 HELEN + 16 LFPW faces, the NME those faces had in the full evaluation."""
    meta = json.loads(open(os.path.join(built[1], datasets.ARRAYS_META)).read())
    with np.load(os.path.join(built[1], "common.npz")) as z:
        common = {k: z[k] for k in z.files}
    names = common["file_name"]
    folders = np.array([f.split("/")[0] for f in names])
    keep = np.concatenate([np.nonzero(folders == sub)[0][np.argsort(names[folders == sub])][:SUBSET_FACES] for sub in ("helen", "lfpw")])
    export = tmp_path / "export"
    export.mkdir()
    np.savez(export / "common.npz", **{k: v[keep] for k, v in common.items()})
    meta["splits"] = {"common": dict(meta["splits"]["common"], num_examples=len(keep))}
    (export / datasets.ARRAYS_META).write_text(json.dumps(meta))

    released = os.path.join(ROOT, "checkpoints")
    before = {f: os.path.getmtime(os.path.join(r, f)) for r, _, fs in os.walk(released) for f in fs}
    monkeypatch.chdir(tmp_path)
    assert cli_eval.main(["--split", "common", "--data_dir", str(export), "--no_progress"]) == 0
    out = capsys.readouterr().out
    assert "common/helen" in out and "common/lfpw" in out
    rep = json.loads((tmp_path / "eval" / "eval_common.json").read_text())
    assert rep["checkpoint"].endswith(os.path.join("checkpoints", "300w_paper")) and rep["num_faces"] == 2 * SUBSET_FACES
    assert rep["subsets"]["helen"]["num_faces"] == rep["subsets"]["lfpw"]["num_faces"] == SUBSET_FACES
    # Slack for other CPUs' rounding (the H200 gave the same 554-face means to 4 digits).
    io, ip = rep["inter_ocular"]["nme"], rep["inter_pupil"]["nme"]
    assert abs(io - SUBSET_NME[0]) < 0.001 and abs(ip - SUBSET_NME[1]) < 0.0015, (io, ip)
    assert {f: os.path.getmtime(os.path.join(r, f)) for r, _, fs in os.walk(released) for f in fs} == before


# Photos per subset (HELEN, LFPW) for the end-to-end test: the released default costs about 1.4 s a photo
# on 2 CPU cores (three passes of the 78-GFLOP network), the small networks a few hundredths; detection and
# re-cut do not depend on the weights, so the many photos go to the small networks.  The last case frames the
# default weights' crops with a small network's landmarks (detect's first_pass).
@pytest.mark.parametrize("weights, per_subset, first_pass", [("300w_cpu42", 40, None), ("300w_cpu48", 20, None), ("300w_cpu", 20, None),
                                                             (PRETRAINED, 4, None), (PRETRAINED, 4, "300w_cpu")])
def test_detect_on_real_photos_finds_every_face_and_keeps_the_accuracy_of_ground_truth_boxes(real_300w, weights, per_subset, first_pass):
    """detect() (YuNet + two passes) on common-subset photos, each holding its annotated face with context:
    every face found, and inter-ocular NME within 1.1x that of crops framed from the ground truth (the full
    554: bench/compare_end_to_end.py)."""
    model = lgcn_jax.load_pretrained(weights)
    size, ratio = model.data.image_size, crop_lib.crop_ratio(model.data.dataset)
    paths = [p for sub in COMMON for p in sorted(glob.glob(os.path.join(real_300w, sub, "*.jpg")))[:per_subset]]
    gt_box, found = [], []
    for path in paths:
        gray, truth = load_gray(path), read_pts(os.path.splitext(path)[0] + ".pts")
        lo, hi = truth.min(0), truth.max(0)  # the evaluation crop: the ground truth's box, side 1.4x, no roll
        (face,) = landmarks(model, [gray], [0], [crop_lib.similarity((lo + hi) / 2, float((hi - lo).max()) * ratio, 0.0, size)], [1.0], refine=0)
        gt_box.append(float(metrics.nme(face.landmarks[None], truth[None])[0]))
        faces = lgcn_jax.detect(gray, model, first_pass=first_pass, refine=None if first_pass is None else 1)
        k = metrics.match_face([f.landmarks for f in faces], truth)
        found.append(None if k is None else float(metrics.nme(faces[k].landmarks[None], truth[None])[0]))
    assert all(f is not None for f in found), sum(f is None for f in found)
    assert np.mean(found) <= 1.1 * np.mean(gt_box), (np.mean(found), np.mean(gt_box))
    assert np.mean(found) < 0.06


def test_decoding_settings_lower_the_nme_of_the_small_network_on_all_common_faces(built):
    """300w_cpu on all 554 common faces (the paper network would take ~15 minutes here): its released window peak
    fits (peak_fit_radius=9) and x_offset, both chosen on the 199 faces held out of train, give 3.86% inter-ocular
    NME, against 3.99% with 3-point peaks (and the offset once released with them) and 3.91% without the offset;
    flip_test 3.79% (checkpoints/README.md; the paper network: 3.33% -> 3.26%)."""
    model = lgcn_jax.load_pretrained("300w_cpu")
    config = dataclasses.replace(model.config, data=dataclasses.replace(model.config.data, data_dir=built[1]))
    assert model.config.postprocess.x_offset == 0.1852 and model.config.postprocess.peak_fit_radius == 9
    assert evaluation.horizontal_offset(model, train.training_splits(config)[1]) == pytest.approx(0.1852, abs=0.002)
    common = datasets.load_split(config.data, "common")
    variants = {"previous": model.with_postprocess(peak_fit_radius=1, x_offset=0.1822), "raw": model.with_postprocess(x_offset=0.0),
                "released": model, "flip": model.with_postprocess(flip_test=True)}
    nme = {k: evaluation.evaluate_landmarks(evaluation.predict_landmarks(m, common), common["landmarks"])["inter_ocular"]["nme"]
           for k, m in variants.items()}
    want = {"previous": 0.03987, "raw": 0.03915, "released": 0.03864, "flip": 0.03789}
    assert all(abs(nme[k] - want[k]) < 0.0003 for k in want), nme
    assert nme["released"] < nme["previous"] - 0.001 and nme["released"] < nme["raw"] - 0.0003 and nme["flip"] < nme["released"] - 0.0005, nme


@pytest.mark.parametrize("weights, size, radius, x_offset, windows, want", [("300w_cpu48", 48, 11, 0.1671, (20, 7), 0.03863),
                                                                            ("300w_cpu42", 42, 11, 0.1305, (), 0.03868)])
def test_the_smaller_crops_keep_the_nme_of_the_64_pixel_network_on_all_common_faces(built, weights, size, radius, x_offset, windows, want):
    """300w_cpu48 and 300w_cpu42 (300w_cpu fine-tuned on 48x48 crops, then on 42x42, distilled from 300w_paper;
    42: the CPU default) on all 554 common faces: 3.86% and 3.87% inter-ocular NME as released
    (checkpoints/README.md), as 300w_cpu on 64x64 crops (3.864%, the test above) for 0.55 and 0.42 of its FLOPs;
    their decoding was chosen on the 199 held-out training faces."""
    model = lgcn_jax.load_pretrained(weights)
    assert model.data.image_size == size and model.params.config == lgcn_jax.load_pretrained("300w_cpu").params.config
    pp = model.config.postprocess
    assert (pp.peak_fit_radius, pp.x_offset, tuple(pp.local_windows)) == (radius, x_offset, windows)
    common = datasets.load_split(dataclasses.replace(model.data, data_dir=built[1]), "common")
    nme = evaluation.evaluate_landmarks(evaluation.predict_landmarks(model, common), common["landmarks"])["inter_ocular"]["nme"]
    assert abs(nme - want) < 0.0003 and nme <= 0.039, nme
