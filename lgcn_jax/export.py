"""The network and its decoding as an ONNX or a LiteRT (.tflite) file, for runtimes without JAX.

    lgcn_jax.export_onnx("300w_cpu", "lgcn.onnx")        # any batch: the input's first dimension is symbolic
    lgcn_jax.export_tflite("300w_cpu", "lgcn.tflite")    # the batch is fixed at export (batch_size=1)

A file maps ``images`` f32[B, S, S, 1] (gray crops in [0, 1], framed as its metadata says) to

    heatmaps    f32[B, S, S, L]   the network's maps (``lgcn_jax.apply``)
    landmarks   f32[B, L, 2]      sub-pixel arg-max of each map, x_offset added (``postprocess.decode_peaks``)
    confidence  f32[B, L]         each map's peak value

The shape-model fit (``lgcn_jax.postprocess``) needs a Cholesky solve and an interior-point loop that
neither format has, so it runs on the heatmaps in NumPy: ``lgcn_jax.decode_numpy.decode``, whose
shape model and settings the metadata also carries.  Metadata (``read_metadata``): the input size,
the crop framing and ratio, the landmark order, the weights' name and licence, the outputs.

The exporters (jax2onnx; TensorFlow's jax2tf and TFLite converter) and the runtimes are the
``export`` extra: ``pip install "lgcn_jax[export]"``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import logging
import os
import subprocess
import sys
import tempfile

import numpy as np

import lgcn_jax
from lgcn_jax.crop import crop_ratio
from lgcn_jax.files import atomic_path
from lgcn_jax.landmarks68 import NUM_POINTS
from lgcn_jax.postprocess import decode_peaks
from lgcn_jax.network import apply
from lgcn_jax.predict import Model
from lgcn_jax.release import export_model, load_model, pretrained_path, resolve_model

__all__ = ["EXPORT_EXTRA", "FORMATS", "INPUT_NAME", "OUTPUT_NAMES", "METADATA_KEY", "inference_function", "metadata",
           "export_onnx", "export_tflite", "export", "read_metadata"]

EXPORT_EXTRA = 'pip install "lgcn_jax[export]"'
FORMATS = {"onnx": ".onnx", "tflite": ".tflite"}
INPUT_NAME = "images"
OUTPUT_NAMES = ("heatmaps", "landmarks", "confidence")
METADATA_KEY = "lgcn_jax"  # the TFLite metadata entry holding the JSON of ``metadata`` (ONNX: one property per key)

LANDMARK_ORDER = ("the 68-point iBUG markup of 300-W, 0-based: 0-16 jaw, 17-21 and 22-26 brows, 27-35 nose, 36-41 the "
                  "subject's right eye (on the image's left), 42-47 the left eye, 48-59 outer lips, 60-67 inner lips")


def _require(what: str, *modules: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"{what} needs {', '.join(missing)}, not installed: {EXPORT_EXTRA}")


def inference_function(model: Model):
    """The function the files hold: images f32[B, S, S, 1] -> (heatmaps f32[B, S, S, L], landmarks f32[B, L, 2],
    confidence f32[B, L]), with the model's weights as constants."""
    # The blur as two batched matmuls: a graph without a platform switch or a loop over the batch, which
    # ONNX Runtime and LiteRT run well at any batch size.
    params, config = model.params.with_execution(dataclasses.replace(model.execution, blur_batching="batch")), model.postprocess
    if config.flip_test:
        # jax2onnx gives the concatenation of a symbolic batch with its mirror image the batch's size, not twice it.
        raise ValueError("test-time mirroring (postprocess.flip_test) is not exported: export "
                         "model.with_postprocess(flip_test=False) and average the maps of mirrored crops yourself")

    def run(images):
        maps = apply(params, images)
        return (maps, *decode_peaks(maps, config))

    return run


def _licence(model: Model) -> str:
    for folder in (model.name, pretrained_path(model.name)):
        path = os.path.join(folder, "LICENSE.md")
        if model.name and os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                return f.read().strip()
    return "not recorded: the model folder holds no LICENSE.md; ask whoever trained the weights, and mind their training data's terms"


def metadata(model: Model) -> dict[str, str]:
    """What a runtime needs to know besides the graph, as strings (JSON where structured)."""
    size, num_l = model.data.image_size, model.params.config.num_landmarks
    shape = model.shape_model
    return {
        "lgcn_jax_version": lgcn_jax.__version__,
        "weights": os.path.basename(os.path.normpath(model.name)) if model.name else "",
        "licence": _licence(model),
        "input": f"{INPUT_NAME} f32[B, {size}, {size}, 1]: gray crops, pixel values / 255",
        "input_size": str(size),
        "crop_ratio": repr(crop_ratio(model.data.dataset)),
        "crop": ("a square crop centred on the centre of the face's landmark box, in the face's own upright axes (rolled "
                 "upright by the line from the right to the left eye centre), side crop_ratio x the box's longer side; a "
                 "face detector's box is only a first estimate: re-cut from the landmarks found"),
        "landmark_order": LANDMARK_ORDER if num_l == NUM_POINTS else f"{num_l} points of the weights' own markup",
        "coordinates": "(x, y) pixels of the crop, pixel centres at integers",
        "outputs": (f"heatmaps f32[B, {size}, {size}, {num_l}] (about 1 at a landmark); landmarks f32[B, {num_l}, 2] (sub-pixel "
                    f"arg-max of each map, x_offset added); confidence f32[B, {num_l}] (each map's peak value)"),
        "decoding": ("landmarks are the arg-max decoding; the paper's shape-model fit runs on the heatmaps in NumPy: "
                     "lgcn_jax.decode_numpy.decode(heatmaps, shape_model, postprocess) with the two entries below"),
        "postprocess": json.dumps(dataclasses.asdict(model.postprocess)),
        "shape_model": "" if shape is None else json.dumps(
            {"mean": np.asarray(shape.mean).tolist(), "components": np.asarray(shape.components).tolist(),
             "lower": np.asarray(shape.lower).tolist(), "upper": np.asarray(shape.upper).tolist(), "image_size": shape.image_size}),
    }


def _target(path: str, fmt: str, overwrite: bool) -> str:
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a folder; give the file to write, e.g. {os.path.join(path, 'lgcn' + FORMATS[fmt])}")
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; nothing was written. Choose another name or pass overwrite=True (--overwrite)")
    return path


@contextlib.contextmanager
def _quiet(*loggers: str):
    """The exporters log a line per node or tensor at WARNING/INFO; errors still show."""
    saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in loggers]
    for logger, _ in saved:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in saved:
            logger.setLevel(level)


def export_onnx(model, path: str, *, overwrite: bool = False, opset: int = 21) -> str:
    """Write ``model`` (a ``Model``, the name of released weights or a model folder) as an ONNX file at ``path``.

    The batch dimension is symbolic ("B"): one file serves any number of crops.  Returns ``path``.
    """
    path = _target(path, "onnx", overwrite)
    _require("export_onnx", "jax2onnx", "onnx")
    import onnx
    from jax2onnx import to_onnx

    model = resolve_model(model, "model")
    size = model.data.image_size
    with _quiet("jax2onnx", "onnx_ir"):
        proto = to_onnx(inference_function(model), [("B", size, size, 1)], model_name="lgcn", opset=opset,
                        input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES))
    proto.doc_string = __doc__.split("\n")[0]
    onnx.helper.set_model_props(proto, metadata(model))
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(proto.SerializeToString())
    return path


def _with_tflite_metadata(blob: bytes, entries: dict[str, str]) -> bytes:
    """The .tflite flatbuffer ``blob`` with a metadata entry ``METADATA_KEY`` holding ``entries`` as JSON."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    tree = schema.ModelT.InitFromPackedBuf(blob, 0)
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(json.dumps(entries).encode("utf-8"), np.uint8)
    tree.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name, entry.buffer = METADATA_KEY, len(tree.buffers) - 1
    tree.metadata = [*(tree.metadata or []), entry]
    tree.description = __doc__.split("\n")[0]
    builder = flatbuffers.Builder(len(blob) + 1024)
    builder.Finish(tree.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def export_tflite(model, path: str, *, batch_size: int = 1, overwrite: bool = False) -> str:
    """Write ``model`` (a ``Model``, the name of released weights or a model folder) as a LiteRT (.tflite) file.

    jax2tf then TensorFlow's TFLite converter; the batch is fixed at ``batch_size`` (the converter cannot lower the
    arg-max with a symbolic batch).  Signature "serving_default": input ``images``, outputs by name.  Returns ``path``.
    The conversion runs in a child Python process (TensorFlow is never imported into the caller's): TensorFlow's
    compiler, loaded beside JAX's, left JIT code registered with the C++ unwinder, and a later JAX compilation in the
    same process crashed (a segmentation fault in libgcc's unwinder, seen in the test suite).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    path = _target(path, "tflite", overwrite)
    _require("export_tflite", "tensorflow", "ai_edge_litert", "flatbuffers")
    model = resolve_model(model, "model")
    with tempfile.TemporaryDirectory(prefix="lgcn_export_") as work:
        folder, flatbuffer = export_model(model, os.path.join(work, "model")), os.path.join(work, "model.tflite")
        # The CPU for the child: the program is lowered for it anyway, and an accelerator stays the caller's.
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "2"}
        run = subprocess.run([sys.executable, "-c", "import sys; from lgcn_jax.export import _convert_tflite; _convert_tflite(*sys.argv[1:])",
                              folder, str(batch_size), flatbuffer], env=env, capture_output=True, text=True)
        if run.returncode != 0:
            raise RuntimeError(f"the TFLite conversion of {model.name or 'the model'} failed (exit {run.returncode}); nothing was "
                               f"written to {path}. Its output ends:\n{run.stderr[-3000:]}")
        with open(flatbuffer, "rb") as f:
            blob = _with_tflite_metadata(f.read(), metadata(model))
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(blob)
    return path


def _convert_tflite(folder: str, batch_size: str, out: str) -> None:
    """The child process of ``export_tflite``: the model folder ``folder`` as a .tflite flatbuffer at ``out``."""
    import tensorflow as tf
    from jax.experimental import jax2tf

    model = load_model(folder)
    size = model.data.image_size
    tf.config.set_visible_devices([], "GPU")
    # Lowered for the CPU whatever JAX's backend: the converter reads the program, and LiteRT runs anywhere.
    converted = jax2tf.convert(inference_function(model), with_gradient=False, native_serialization_platforms=("cpu",))

    @tf.function(autograph=False)
    def serve(images):
        return dict(zip(OUTPUT_NAMES, converted(images)))

    signature = serve.get_concrete_function(tf.TensorSpec([int(batch_size), size, size, 1], tf.float32, name=INPUT_NAME))
    module = tf.Module()
    module.serve = serve
    # Through a SavedModel, whose signature names the inputs and outputs in the .tflite file.
    with tempfile.TemporaryDirectory(prefix="lgcn_export_") as saved, _quiet("absl", "tensorflow"):
        tf.saved_model.save(module, saved, signatures={"serving_default": signature})
        blob = tf.lite.TFLiteConverter.from_saved_model(saved).convert()
    with open(out, "wb") as f:
        f.write(blob)


def export(model, path: str, fmt: str | None = None, **options) -> str:
    """``export_onnx`` or ``export_tflite`` by ``fmt`` ("onnx", "tflite"; None: by the file's ending)."""
    fmt = fmt or next((f for f, ending in FORMATS.items() if os.fspath(path).lower().endswith(ending)), None)
    if fmt not in FORMATS:
        raise ValueError(f"cannot tell the format of {path}: name it .onnx or .tflite, or give the format ({', '.join(FORMATS)})")
    return (export_onnx if fmt == "onnx" else export_tflite)(model, path, **options)


def read_metadata(path: str) -> dict[str, str]:
    """The ``metadata`` an exported file holds (an ONNX file's properties; a .tflite file's ``METADATA_KEY`` entry)."""
    with open(path, "rb") as f:
        blob = f.read()
    if blob[4:8] == b"TFL3":
        _require("reading a .tflite file", "ai_edge_litert")
        from ai_edge_litert import schema_py_generated as schema

        tree = schema.Model.GetRootAs(blob, 0)
        for i in range(tree.MetadataLength()):
            if tree.Metadata(i).Name().decode() == METADATA_KEY:
                return json.loads(tree.Buffers(tree.Metadata(i).Buffer()).DataAsNumpy().tobytes())
        return {}
    _require("reading an ONNX file", "onnx")
    import onnx

    return {p.key: p.value for p in onnx.load_model_from_string(blob).metadata_props}
