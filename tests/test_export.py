"""lgcn-export: ONNX Runtime and LiteRT give the heatmaps of ``lgcn_jax.apply`` and, through their arg-max outputs
and ``decode_numpy``, the landmarks of ``predict``; the example runs without JAX; bad checkpoints are named.

Both released networks, on a few real 300-W crops (``real_300w``; synthetic faces where absent).  Each file is
exported once per module and worker (the paper network's take about 10 s each on 2 cores).  The tests that
need the exporters or a runtime skip where the ``export`` extra is not installed.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import lgcn_jax
from data_prep.layout_300w import read_pts
from data_prep.synthetic_faces import make_face
from lgcn_jax import crop as crop_lib
from lgcn_jax import decode_numpy, export
from lgcn_jax.cli import export as cli_export
from lgcn_jax.image_io import load_gray
from tests.conftest import ROOT

NETWORKS = ("300w_cpu", "300w_paper")
NUM_FACES = 2  # the paper network costs ~0.5 s a face on 2 cores in each runtime
HEATMAP_TOLERANCE = 1e-4
LANDMARK_TOLERANCE = 0.05  # pixels of the crop
PHOTO = os.path.join(os.path.dirname(__import__("matplotlib").__file__), "mpl-data", "sample_data", "grace_hopper.jpg")


def _onnx_tools():
    pytest.importorskip("jax2onnx", reason='the export extra: pip install "lgcn_jax[export]"')
    return pytest.importorskip("onnxruntime", reason='the export extra: pip install "lgcn_jax[export]"')


def _tflite_tools():
    pytest.importorskip("tensorflow", reason='the export extra: pip install "lgcn_jax[export]"')
    return pytest.importorskip("ai_edge_litert.interpreter", reason='the export extra: pip install "lgcn_jax[export]"')


@pytest.fixture(scope="module")
def crops(request):
    """size -> u8[NUM_FACES, size, size, 1]: real 300-W faces cut as in training, else synthetic ones."""
    try:
        folder = request.getfixturevalue("real_300w")
    except pytest.skip.Exception:
        folder = None
    photos = sorted(glob.glob(os.path.join(folder, "helen", "testset", "*.jpg")))[:NUM_FACES] if folder else []
    faces = []
    for path in photos:
        faces.append((load_gray(path), crop_lib.landmark_box(read_pts(os.path.splitext(path)[0] + ".pts"))))

    def get(size):
        if len(faces) == NUM_FACES:
            return np.stack([crop_lib.crop(gray, box, size) for gray, box in faces])[..., None]
        return np.stack([make_face(seed, size)[0] for seed in range(NUM_FACES)])[..., None]

    return get


@pytest.fixture(scope="module")
def reference(crops):
    """name -> (images f32[N, S, S, 1], XLA heatmaps, predict's landmarks and confidence, the arg-max decoding's)."""
    cache = {}

    def get(name):
        if name not in cache:
            model = lgcn_jax.load_pretrained(name)
            images = (crops(model.data.image_size) / 255.0).astype(np.float32)
            peaks = lgcn_jax.predict_with_confidence(model.with_postprocess(use_shape_model=False), images)
            cache[name] = (images, np.asarray(lgcn_jax.apply(model.params, images)),
                           *map(np.asarray, lgcn_jax.predict_with_confidence(model, images)), *map(np.asarray, peaks))
        return cache[name]

    return get


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(name, format) -> the exported file; the small network's ONNX file through the command line."""
    folder = tmp_path_factory.mktemp("export")
    cache = {}

    def get(name, fmt):
        if (name, fmt) not in cache:
            path = str(folder / f"{name}.{fmt}")
            if (name, fmt) == ("300w_cpu", "onnx"):
                assert cli_export.main([name, "--format", "onnx", "--out", path]) == 0
            else:
                export.export(name, path, fmt, **({"batch_size": NUM_FACES} if fmt == "tflite" else {}))
            cache[name, fmt] = path
        return cache[name, fmt]

    return get


def _run_onnx(path, images):
    ort = _onnx_tools()
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return dict(zip(export.OUTPUT_NAMES, session.run(list(export.OUTPUT_NAMES), {export.INPUT_NAME: images})))


def _run_tflite(path, images):
    litert = _tflite_tools()
    runner = litert.Interpreter(model_path=path, num_threads=2).get_signature_runner()
    return runner(**{export.INPUT_NAME: images})


def _check_parity(name, outputs, reference, meta):
    images, heatmaps, landmarks, confidence, peaks, peak_values = reference
    np.testing.assert_allclose(outputs["heatmaps"], heatmaps, rtol=0, atol=HEATMAP_TOLERANCE)
    # The file's own decoding is the arg-max one; decode_numpy on its maps, with the shape model it carries, is predict's.
    np.testing.assert_allclose(outputs["landmarks"], peaks, rtol=0, atol=LANDMARK_TOLERANCE)
    np.testing.assert_allclose(outputs["confidence"], peak_values, rtol=0, atol=HEATMAP_TOLERANCE)
    postprocess = lgcn_jax.PostprocessConfig(**json.loads(meta["postprocess"]))
    decoded, decoded_confidence = decode_numpy.decode(outputs["heatmaps"], json.loads(meta["shape_model"]), postprocess)
    np.testing.assert_allclose(decoded, landmarks, rtol=0, atol=LANDMARK_TOLERANCE)
    np.testing.assert_allclose(decoded_confidence, confidence, rtol=0, atol=HEATMAP_TOLERANCE)
    model = lgcn_jax.load_pretrained(name)
    assert meta["weights"] == name and "non-commercial research" in meta["licence"]
    assert int(meta["input_size"]) == model.data.image_size == images.shape[1]
    assert float(meta["crop_ratio"]) == crop_lib.crop_ratio(model.data.dataset) == 1.4
    assert meta["landmark_order"].startswith("the 68-point iBUG markup")


@pytest.mark.parametrize("name", NETWORKS)
def test_onnx_runtime_matches_xla(name, exported, reference):
    _onnx_tools()
    path = exported(name, "onnx")
    images = reference(name)[0]
    outputs = _run_onnx(path, images)
    _check_parity(name, outputs, reference(name), export.read_metadata(path))
    # The batch is symbolic: one face gives that face's maps.
    one = _run_onnx(path, images[1:])
    np.testing.assert_allclose(one["heatmaps"][0], outputs["heatmaps"][1], rtol=0, atol=HEATMAP_TOLERANCE)


@pytest.mark.parametrize("name", NETWORKS)
def test_litert_matches_xla(name, exported, reference):
    _tflite_tools()
    path = exported(name, "tflite")
    _check_parity(name, _run_tflite(path, reference(name)[0]), reference(name), export.read_metadata(path))


def test_the_example_finds_the_landmarks_of_detect_without_jax(exported, tmp_path):
    """examples/onnx_landmarks.py on a photo: one face, never importing JAX, the landmarks of ``detect`` with the
    same arg-max decoding to a fraction of a pixel (the crops are cut by OpenCV there, by Pillow here)."""
    _onnx_tools()
    path = exported("300w_cpu", "onnx")
    out = tmp_path / "annotated.png"
    script = os.path.join(ROOT, "examples", "onnx_landmarks.py")
    code = ("import runpy, sys\n"
            f"sys.argv = [{script!r}, {PHOTO!r}, '--model', {path!r}, '--out', {str(out)!r}]\n"
            "try:\n"
            "    runpy.run_path(sys.argv[0], run_name='__main__')\n"
            "except SystemExit as e:\n"
            "    assert not e.code, e.code\n"
            "assert not [m for m in sys.modules if m == 'jax' or m.startswith(('jax.', 'lgcn_jax'))], 'JAX was imported'\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    (face,) = json.loads(run.stdout.strip().splitlines()[-1])["faces"]
    assert out.stat().st_size > 0
    # The example searches the full photo and makes two passes, as detect(detector="yunet", refine=1) does.
    (reference,) = lgcn_jax.detect(PHOTO, lgcn_jax.load_pretrained("300w_cpu").with_postprocess(use_shape_model=False), detector="yunet",
                                   refine=1)
    distance = np.linalg.norm(np.asarray(face["landmarks"]) - reference.landmarks, axis=1)
    assert distance.mean() < 0.5 and distance.max() < 2.0, distance  # pixels of a face ~110 px between the eyes


def test_decode_numpy_is_postprocess(reference):
    """Every decoding setting on the small network's maps: decode_numpy gives postprocess's landmarks."""
    model = lgcn_jax.load_pretrained("300w_cpu")
    heatmaps = reference("300w_cpu")[1]
    for changes in ({}, {"use_shape_model": False}, {"blend": False, "peak_fit_radius": 1},
                    {"local_windows": (), "constraints": False, "num_components": 4, "x_offset": 0.0}):
        config = dataclasses.replace(model.postprocess, **changes)
        want, want_confidence = lgcn_jax.postprocess_with_confidence(heatmaps, model.shape_model, config)
        got, got_confidence = decode_numpy.decode(heatmaps, model.shape_model, config)
        np.testing.assert_allclose(got, want, rtol=0, atol=LANDMARK_TOLERANCE, err_msg=str(changes))
        np.testing.assert_allclose(got_confidence, want_confidence, rtol=0, atol=1e-5, err_msg=str(changes))
    with pytest.raises(ValueError, match="no shape model"):
        decode_numpy.decode(heatmaps, None, model.postprocess)


def test_decode_numpy_interior_point_is_solve_qp():
    """Where the unconstrained minimiser breaks constraints, both solvers find the same constrained one."""
    from lgcn_jax.postprocess import solve_qp

    rng = np.random.default_rng(0)
    a = rng.normal(size=(12, 12))
    hess, grad = a @ a.T + np.eye(12), 10 * rng.normal(size=12)
    rows, bound = rng.normal(size=(30, 12)), np.abs(rng.normal(size=30)) + 0.1
    free = np.linalg.solve(hess, -grad)
    assert np.any(rows @ free > bound)
    got = decode_numpy.solve_qp(hess, grad, rows, bound)
    np.testing.assert_allclose(got, np.asarray(solve_qp(*(np.float32(v) for v in (hess, grad, rows, bound)))), atol=1e-3)
    assert np.all(rows @ got <= bound + 1e-6)


@pytest.mark.parametrize("checkpoint, message", [
    ("no_such_weights", "no released checkpoint of that name"),
    (os.path.join("no", "such", "folder"), "is not a folder; a model is a folder holding config.json"),
    (os.path.join(ROOT, "checkpoints", "300w_cpu", "params.msgpack"), "is not a folder"),
    ("{empty}", "config.json does not exist"),
])
def test_a_bad_checkpoint_is_one_line_naming_it(checkpoint, message, tmp_path, capsys):
    checkpoint = checkpoint.replace("{empty}", str(tmp_path))
    assert cli_export.main([checkpoint, "--out", str(tmp_path / "x.onnx")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("lgcn-export: error:") and message in err and checkpoint in err and "\n" not in err, err
    assert not (tmp_path / "x.onnx").exists()


def test_an_existing_file_is_kept_and_a_missing_extra_is_named(tmp_path, capsys, monkeypatch):
    out = tmp_path / "mine.onnx"
    out.write_text("not ours")
    assert cli_export.main(["300w_cpu", "--out", str(out)]) == 1
    assert "exists; nothing was written" in capsys.readouterr().err and out.read_text() == "not ours"
    assert cli_export.main(["300w_cpu", "--out", str(tmp_path / "x.bin")]) == 1
    assert "cannot tell the format" in capsys.readouterr().err
    for missing, fmt in (("jax2onnx", "onnx"), ("tensorflow", "tflite")):
        monkeypatch.setitem(sys.modules, missing, None)
        with pytest.raises(ImportError, match=r'needs .*pip install "lgcn_jax\[export\]"'):
            export.export("300w_cpu", str(tmp_path / f"x.{fmt}"))
    with pytest.raises(ValueError, match="flip_test"):
        export.inference_function(lgcn_jax.load_pretrained("300w_cpu").with_postprocess(flip_test=True))


def test_importing_lgcn_jax_loads_no_exporter():
    code = ("import sys, lgcn_jax\n"
            "assert callable(lgcn_jax.export_onnx) and callable(lgcn_jax.export_tflite) and callable(lgcn_jax.decode_numpy.decode)\n"
            "loaded = [m for m in ('jax2onnx', 'onnx', 'onnxruntime', 'tensorflow', 'ai_edge_litert') if m in sys.modules]\n"
            "assert not loaded, loaded\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]


def test_the_tflite_conversion_leaves_tensorflow_out_of_the_callers_process(tmp_path):
    """TensorFlow converts in a child process: beside JAX's compiler it once crashed a later JAX compilation."""
    out = tmp_path / "quick.tflite"
    code = ("import sys, jax, jax.numpy as jnp, lgcn_jax\n"
            f"lgcn_jax.export_tflite('synthetic_quick', {str(out)!r})\n"
            "assert 'tensorflow' not in sys.modules\n"
            "print(float(jax.jit(lambda x: jnp.linalg.cholesky(x).sum())(jnp.eye(3))))\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split()[-1] == "3.0" and export.read_metadata(str(out))["weights"] == "synthetic_quick"
