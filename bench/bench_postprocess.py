"""Post-processing per face: the jit-compiled, batched jnp version against the NumPy/SciPy reference.

    python bench/bench_postprocess.py [--batch 32] [--reference_faces 3]

Heatmaps are rendered at synthetic faces with noise and uneven confidence; the
shape model is learned from synthetic training shapes.  Prints a table and
writes bench/results_postprocess.json.
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
from tests import reference_postprocess as ref


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--train_shapes", type=int, default=500)
    p.add_argument("--reference_faces", type=int, default=3, help="the reference takes about a second per face")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--only_full", action="store_true", help="time only the full post-processing (smoke runs)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results_postprocess.json"))
    args = p.parse_args(argv)
    shapes = np.stack([make_face(s, args.size)[1] for s in range(args.train_shapes)])
    sm, rm = build_shape_model(shapes, args.size), ref.build_model(shapes, args.size)
    rng = np.random.default_rng(0)
    truth = np.stack([make_face(100000 + s, args.size)[1] for s in range(args.batch)]) + rng.normal(0, 1.0, (args.batch, 68, 2))
    kernel = model_kernel(ModelConfig(kernel_size=45 if args.size >= 96 else 31))
    hm = np.asarray(render_targets(jnp.asarray(truth, jnp.float32), args.size, args.size, kernel)[0])
    hm = (hm * rng.uniform(0.2, 1.0, (args.batch, 1, 1, 68)) + 0.02 * rng.normal(size=hm.shape)).astype(np.float32)
    hm_dev = jnp.asarray(hm)
    rows = []
    stages = [("arg-max only", PostprocessConfig(use_shape_model=False)), ("global fit", PostprocessConfig(local_windows=(), blend=False)),
              ("full, 3-point peaks", PostprocessConfig(peak_fit_radius=1)), ("full (global+20+7+blend)", PostprocessConfig())]
    for name, cfg in stages[-1:] if args.only_full else stages:
        t_batch = median_time(lambda h: postprocess(h, sm, cfg), hm_dev, repeats=args.repeats)
        # Batch 1: each of the first faces alone (their cost differs: a fit with an active order
        # constraint needs the interior point), the mean of their medians.
        t_one = np.mean([median_time(lambda h: postprocess(h, sm, cfg), hm_dev[i:i + 1], repeats=args.repeats) for i in range(min(8, args.batch))])
        rows.append({"stages": name, "jnp_batch_ms_per_face": 1e3 * t_batch / args.batch, "jnp_batch1_ms": 1e3 * t_one})
    n = min(args.reference_faces, args.batch)
    t = time.perf_counter()
    want = ref.postprocess(hm[:n], rm)
    t_ref = (time.perf_counter() - t) / n
    got = np.asarray(postprocess(hm_dev[:n], sm))
    full = rows[-1]
    full.update({"reference_ms_per_face": 1e3 * t_ref, "speedup_batched": 1e3 * t_ref / full["jnp_batch_ms_per_face"],
                 "speedup_batch1": 1e3 * t_ref / full["jnp_batch1_ms"], "max_abs_diff_px": float(np.abs(got - want).max()),
                 "reference_faces": n})
    for r in rows:
        line = f"{r['stages']:<26} jnp batch {args.batch}: {r['jnp_batch_ms_per_face']:7.2f} ms/face   batch 1 (mean of 8 faces): {r['jnp_batch1_ms']:7.2f} ms"
        if "reference_ms_per_face" in r:
            line += (f"   NumPy/SciPy: {r['reference_ms_per_face']:8.1f} ms/face   speed-up {r['speedup_batched']:6.1f}x (batched), "
                     f"{r['speedup_batch1']:5.1f}x (batch 1)   max diff {r['max_abs_diff_px']:.4f} px")
        print(line, flush=True)
    result = {"machine": machine(), "batch": args.batch, "size": args.size, "constraints": int(sm.lower.shape[0]),
              "reference_constraints": int(len(rm["pairs"])), "rows": rows}
    return write_results(result, args.out)


if __name__ == "__main__":
    main()
