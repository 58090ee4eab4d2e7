"""Kernel convolution: our op against a direct depthwise convolution, forward and backward.

    python bench/bench_kernel_conv.py [--batch 1 32] [--repeats 5]

Prints a table and writes bench/results_kernel_conv.json; every ratio is measured in this run.
"""

from __future__ import annotations

import argparse
import os

from common import machine, median_time, write_results

import jax
import jax.numpy as jnp

from lgcn_jax.config import ModelConfig
from lgcn_jax.kernel_conv import kernel_conv, kernel_conv_direct
from lgcn_jax.network import model_kernel


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
        fast = jax.jit(lambda x: kernel_conv(x, k))
        direct = jax.jit(lambda x: kernel_conv_direct(x, k))
        # The cotangent is an argument: the op is linear, so with a constant cotangent
        # XLA would fold the whole backward pass at compile time.
        fast_bwd = jax.jit(lambda xc: jax.vjp(lambda x: kernel_conv(x, k), xc[0])[1](xc[1])[0])
        direct_bwd = jax.jit(lambda xc: jax.vjp(lambda x: kernel_conv_direct(x, k), xc[0])[1](xc[1])[0])
        err = float(jnp.linalg.norm(fast(x) - direct(x)) / jnp.linalg.norm(direct(x)))
        for name, f, d, arg in (("forward", fast, direct, x), ("backward", fast_bwd, direct_bwd, (x, ct))):
            tf, td = median_time(f, arg, repeats=args.repeats), median_time(d, arg, repeats=args.direct_repeats)
            rows.append({"batch": b, "pass": name, "ours_s": tf, "direct_s": td, "speedup": td / tf, "rel_err": err})
            print(f"B={b:<3} {name:<9} ours {tf * 1e3:9.1f} ms   direct {td * 1e3:10.1f} ms   speed-up {td / tf:7.1f}x   rel.err {err:.1e}", flush=True)
    result = {"machine": machine(), "kernel": repr(k), "shape": [args.size, args.size, args.channels], "rows": rows}
    return write_results(result, args.out)


if __name__ == "__main__":
    main()
