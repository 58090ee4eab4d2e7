"""Post-processing per face, stage by stage: the jit-compiled jnp decoding batched, and one face at a time.

    python bench/bench_postprocess.py [--batch 32]

Heatmaps are rendered at synthetic faces with noise and uneven confidence; the shape model is
learned from synthetic training shapes.  Each stage is timed against the cheapest decoding
(arg-max only) in the same run.  Prints a table and writes bench/results_postprocess.json.
(The agreement with the plain NumPy/SciPy algorithm is a test: tests/test_postprocess.py.)
"""

from __future__ import annotations

import argparse
import os
import time

from common import machine, median_time, write_results

import jax.numpy as jnp
import numpy as np

from data_prep.synthetic_faces import make_face
from lgcn_jax.config import ModelConfig, PostprocessConfig
from lgcn_jax.heatmaps import render_targets
from lgcn_jax.network import model_kernel
from lgcn_jax.postprocess import postprocess
from lgcn_jax.shape_model import build_shape_model


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--train_shapes", type=int, default=500)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--only_full", action="store_true", help="time only arg-max and the full post-processing (smoke runs)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results_postprocess.json"))
    args = p.parse_args(argv)
    shapes = np.stack([make_face(s, args.size)[1] for s in range(args.train_shapes)])
    sm = build_shape_model(shapes, args.size)
    rng = np.random.default_rng(0)
    truth = np.stack([make_face(100000 + s, args.size)[1] for s in range(args.batch)]) + rng.normal(0, 1.0, (args.batch, 68, 2))
    kernel = model_kernel(ModelConfig(kernel_size=45 if args.size >= 96 else 31))
    hm = np.asarray(render_targets(jnp.asarray(truth, jnp.float32), args.size, args.size, kernel)[0])
    hm = (hm * rng.uniform(0.2, 1.0, (args.batch, 1, 1, 68)) + 0.02 * rng.normal(size=hm.shape)).astype(np.float32)
    hm_dev = jnp.asarray(hm)
    rows = []
    stages = [("arg-max only", PostprocessConfig(use_shape_model=False)), ("global fit", PostprocessConfig(local_windows=(), blend=False)),
              ("full, 3-point peaks", PostprocessConfig(peak_fit_radius=1)), ("full (global+20+7+blend)", PostprocessConfig())]
    for name, cfg in [stages[0], stages[-1]] if args.only_full else stages:
        t_batch = median_time(lambda h: postprocess(h, sm, cfg), hm_dev, repeats=args.repeats)
        # Batch 1: each of the first faces alone (their cost differs: a fit with an active order
        # constraint needs the interior point), the mean of their medians.
        t_one = np.mean([median_time(lambda h: postprocess(h, sm, cfg), hm_dev[i:i + 1], repeats=args.repeats) for i in range(min(8, args.batch))])
        rows.append({"stages": name, "jnp_batch_ms_per_face": 1e3 * t_batch / args.batch, "jnp_batch1_ms": 1e3 * t_one})
    base = rows[0]
    for r in rows:
        r["batch_over_argmax"] = r["jnp_batch_ms_per_face"] / base["jnp_batch_ms_per_face"]
        r["batch1_over_argmax"] = r["jnp_batch1_ms"] / base["jnp_batch1_ms"]
    for r in rows:
        print(f"{r['stages']:<26} jnp batch {args.batch}: {r['jnp_batch_ms_per_face']:7.2f} ms/face ({r['batch_over_argmax']:4.1f}x arg-max)   "
              f"batch 1 (mean of 8 faces): {r['jnp_batch1_ms']:7.2f} ms ({r['batch1_over_argmax']:4.1f}x)", flush=True)
    result = {"machine": machine(), "batch": args.batch, "size": args.size, "constraints": int(sm.lower.shape[0]), "rows": rows}
    return write_results(result, args.out)


if __name__ == "__main__":
    main()
