"""ms per face through ONNX Runtime and LiteRT against XLA (``lgcn_jax.apply`` / ``predict``), in one run.

    python bench/bench_export.py                     # both released networks: about 2 minutes on 2 cores
    python bench/bench_export.py --networks 300w_cpu

Each network is exported (lgcn_jax.export) to a temporary folder, then timed on synthetic face crops
(data_prep.synthetic_faces) at each batch size: the file's graph (heatmaps + arg-max) against ``apply``
(heatmaps only), and the graph followed by ``decode_numpy`` (the full decoding) against ``predict``.
Medians of repeats after a warm-up; every runtime on all the machine's cores.  Also records the
files' sizes, the export times and the largest differences from XLA on these faces.  Writes
bench/results_export.json with the machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

from common import machine, median_time, write_results  # noqa: E402  (puts the checkout on sys.path)

import lgcn_jax  # noqa: E402
from data_prep.synthetic_faces import make_face  # noqa: E402
from lgcn_jax import decode_numpy, export  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def bench_network(name: str, batch_sizes: list[int], repeats: int, folder: str) -> dict:
    import onnxruntime as ort
    from ai_edge_litert.interpreter import Interpreter

    model = lgcn_jax.load_pretrained(name)
    size, threads = model.data.image_size, os.cpu_count()
    result = {"image_size": size, "batches": {}}
    onnx_path = os.path.join(folder, f"{name}.onnx")
    t = time.perf_counter()
    export.export_onnx(model, onnx_path)
    result["onnx"] = {"export_s": round(time.perf_counter() - t, 1), "mb": round(os.path.getsize(onnx_path) / 1e6, 2)}
    session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    for b in batch_sizes:
        tflite_path = os.path.join(folder, f"{name}_b{b}.tflite")
        t = time.perf_counter()
        export.export_tflite(model, tflite_path, batch_size=b)
        result.setdefault("tflite", {})[f"b{b}"] = {"export_s": round(time.perf_counter() - t, 1),
                                                    "mb": round(os.path.getsize(tflite_path) / 1e6, 2)}
        runner = Interpreter(model_path=tflite_path, num_threads=threads).get_signature_runner()
        images = (np.stack([make_face(1000 + i, size)[0] for i in range(b)])[..., None] / 255.0).astype(np.float32)

        def onnx_graph():
            return session.run(None, {"images": images})

        def litert_graph():
            return runner(images=images)

        def onnx_full():
            return decode_numpy.decode(onnx_graph()[0], model.shape_model, model.postprocess)

        def litert_full():
            return decode_numpy.decode(litert_graph()["heatmaps"], model.shape_model, model.postprocess)

        maps = np.asarray(lgcn_jax.apply(model.params, images))
        timings = {
            "xla_apply": median_time(lgcn_jax.apply, model.params, images, repeats=repeats),
            "onnx_graph": median_time(onnx_graph, repeats=repeats),
            "litert_graph": median_time(litert_graph, repeats=repeats),
            "xla_predict": median_time(lgcn_jax.predict, model, images, repeats=repeats),
            "onnx_plus_decode_numpy": median_time(onnx_full, repeats=repeats),
            "litert_plus_decode_numpy": median_time(litert_full, repeats=repeats),
            "decode_numpy_alone": median_time(decode_numpy.decode, maps, model.shape_model, model.postprocess, repeats=repeats),
        }
        landmarks = np.asarray(lgcn_jax.predict(model, images))
        onnx_maps, litert_maps = onnx_graph()[0], litert_graph()["heatmaps"]
        result["batches"][f"b{b}"] = {
            "ms_per_face": {k: round(v * 1e3 / b, 2) for k, v in timings.items()},
            "max_heatmap_diff_vs_xla": {"onnx": float(np.abs(onnx_maps - maps).max()), "litert": float(np.abs(litert_maps - maps).max())},
            "max_landmark_diff_vs_predict_px": {
                "onnx_plus_decode_numpy": float(np.abs(onnx_full()[0] - landmarks).max()),
                "litert_plus_decode_numpy": float(np.abs(litert_full()[0] - landmarks).max())},
        }
        print(name, f"B={b}", result["batches"][f"b{b}"]["ms_per_face"], flush=True)
    return result


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--networks", nargs="+", default=["300w_cpu", "300w_paper"])
    p.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=os.path.join(HERE, "results_export.json"))
    args = p.parse_args(argv)
    import onnxruntime
    import tensorflow as tf
    from ai_edge_litert import __version__ as litert_version

    versions = {"onnxruntime": onnxruntime.__version__, "ai_edge_litert": litert_version, "tensorflow": tf.__version__}
    with tempfile.TemporaryDirectory(prefix="lgcn_bench_export_") as folder:
        results = {name: bench_network(name, args.batch_sizes, args.repeats, folder) for name in args.networks}
    return write_results({"machine": {**machine(), **versions}, "repeats": args.repeats, "networks": results}, args.out)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
