"""Kernel convolution: our op against a direct depthwise convolution, forward and backward, and its two ways
of taking a batch (``execution.blur_batching``: the matmuls one image at a time, or once for the batch).

    python bench/bench_kernel_conv.py [--batch 1 32] [--size 96 --channels 68] [--repeats 5]

Prints a table and writes bench/results_kernel_conv.json; every ratio is measured in this run.
"""

from __future__ import annotations

import argparse
import functools
import os

from common import machine, median_time, write_results

import jax
import jax.numpy as jnp

from lgcn_jax.config import ModelConfig
from lgcn_jax.kernel_conv import kernel_conv, kernel_conv_direct
from lgcn_jax.network import model_kernel


def _backward(op):
    # The cotangent is an argument: the op is linear, so with a constant cotangent
    # XLA would fold the whole backward pass at compile time.
    return jax.jit(lambda xc: jax.vjp(op, xc[0])[1](xc[1])[0])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--channels", type=int, default=68)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--direct_repeats", type=int, default=1, help="the direct conv is slow; fewer repeats")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results_kernel_conv.json"))
    args = p.parse_args(argv)
    k = model_kernel(ModelConfig())
    rows = []
    for b in args.batch:
        x = jax.random.normal(jax.random.key(0), (b, args.size, args.size, args.channels))
        ct = jax.random.normal(jax.random.key(1), x.shape)
        ops = {way: functools.partial(kernel_conv, kernel=k, batching=way) for way in ("auto", "batch", "image")}  # "auto": by platform
        ops["direct"] = functools.partial(kernel_conv_direct, kernel=k)
        forward = {way: jax.jit(op) for way, op in ops.items()}
        backward = {way: _backward(op) for way, op in ops.items()}
        fast, batched, per_image, direct = (forward[w] for w in ("auto", "batch", "image", "direct"))
        fast_bwd, batched_bwd, per_image_bwd, direct_bwd = (backward[w] for w in ("auto", "batch", "image", "direct"))
        err = float(jnp.linalg.norm(fast(x) - direct(x)) / jnp.linalg.norm(direct(x)))
        for name, f, fb, fi, d, arg in (("forward", fast, batched, per_image, direct, x),
                                        ("backward", fast_bwd, batched_bwd, per_image_bwd, direct_bwd, (x, ct))):
            tf, td = median_time(f, arg, repeats=args.repeats), median_time(d, arg, repeats=args.direct_repeats)
            row = {"batch": b, "pass": name, "ours_s": tf, "direct_s": td, "speedup": td / tf, "rel_err": err}
            line = f"B={b:<3} {name:<9} ours {tf * 1e3:9.1f} ms   direct {td * 1e3:10.1f} ms   speed-up {td / tf:7.1f}x   rel.err {err:.1e}"
            if b > 1:  # one image: both ways are the same program
                tb, ti = median_time(fb, arg, repeats=args.repeats), median_time(fi, arg, repeats=args.repeats)
                row.update(batched_s=tb, per_image_s=ti, batched_over_per_image=tb / ti)
                line += f"   | batched {tb * 1e3:8.1f} ms, one image at a time {ti * 1e3:8.1f} ms ({tb / ti:.2f}x)"
            rows.append(row)
            print(line, flush=True)
    result = {"machine": machine(), "kernel": repr(k), "shape": [args.size, args.size, args.channels], "rows": rows,
              "ours": "kernel_conv with blur_batching='auto' (one image at a time on a CPU, batched matmuls elsewhere)"}
    return write_results(result, args.out)


if __name__ == "__main__":
    main()
