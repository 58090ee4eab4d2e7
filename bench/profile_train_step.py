"""Where does a training step's time go?  A breakdown of ``train_step`` against ``apply``, in one run.

    python bench/profile_train_step.py [--preset paper] [--batch 32] [--trace DIR]

Times, after warm-up and as medians, on this machine's first device:
  * the whole step: ``apply`` (inference; also with BatchNorm not folded into the convolutions,
    ``execution.fold_batch_norm=false``), the training-mode forward, loss + gradients, the full
    ``train_step``, ``train_step`` with the on-device augmentation of the TF-free pipeline,
    ``train_step`` with the global subnet as dilated convolutions instead of on sub-grids,
    ``train_step`` with BatchNorm -> ReLU -> dropout left to autodiff (``execution.fused_batch_norm=false``),
    and ``apply`` and ``train_step`` with bf16 convolution blocks (``execution.compute_dtype``);
  * every kind of layer of the network on its own, forward, input gradient (dx) and weight
    gradient (dw), times the number of such layers: the 5x5 and 3x3 local convolutions, the
    dilated global ones (also as plain convolutions on sub-grids), the blur (``kernel_conv``; also
    at JAX's default matmul precision, TF32 on GPUs, and the library's earlier form with layout
    transposes), BatchNorm + ReLU + dropout (the fused op, and the same left to autodiff);
  * XLA's own FLOP and byte counts of the compiled forward and step.
Needs no TensorFlow.  Writes bench/results_profile.json (with the device) and, with --trace,
a jax.profiler trace for TensorBoard or Perfetto, summarised per kind of kernel and per layer on
an accelerator (bench/trace_summary.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import os

import trace_summary
from common import machine, median_time, write_results

import jax
import jax.numpy as jnp
import numpy as np

import lgcn_jax
from lgcn_jax import network, step
from lgcn_jax.train_state import create_train_state
from lgcn_jax.batch_norm import BNReLUDropout
from lgcn_jax.config import DataConfig


PARTS = ("apply", "apply_unfolded_bn", "forward_train_mode", "loss_and_grads", "train_step", "train_step_device_augment",
         "train_step_dilated_convs", "train_step_unfused_bn", "apply_bf16", "train_step_bf16")


def _conv(dilation):
    def f(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", rhs_dilation=(dilation, dilation),
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return f


def _parts(f, x, w):
    """ms of forward, d/dx and d/dw of sum(f(x, w) * ct) (the cotangent is an argument: XLA cannot fold it)."""
    ct = jnp.ones_like(jax.eval_shape(f, x, w))
    fwd = jax.jit(f)
    dx = jax.jit(jax.grad(lambda x, w, c: jnp.vdot(f(x, w), c), 0))
    dw = jax.jit(jax.grad(lambda x, w, c: jnp.vdot(f(x, w), c), 1))
    return (median_time(fwd, x, w) * 1e3, median_time(dx, x, w, ct) * 1e3, median_time(dw, x, w, ct) * 1e3)


def blur_einsum(x, kernel, precision=None):
    """``kernel_conv(x, kernel)`` for f32[B, H, W, C] as the library computed it before: two einsums.

    "rwq,bhqc->bhrwc" then "rhp,bprwc->bhwc" contract an inner axis of NHWC with the Toeplitz
    factors; a GPU compile moves x and the R-times-larger intermediate through layout transposes
    for them (bench/gpu_hlo_offline.py).  Kept to time against the library's transpose-free form.
    """
    th = jnp.asarray(kernel.toeplitz(0, x.shape[1]))  # [R, H, H]
    tw = jnp.asarray(kernel.toeplitz(1, x.shape[2]))  # [R, W, W]
    y = jnp.einsum("rwq,bhqc->bhrwc", tw, x, precision=precision)
    return jnp.einsum("rhp,bprwc->bhwc", th, y, precision=precision)


def layer_breakdown(cfg, b: int) -> list[dict]:
    m, s = cfg.model, cfg.data.image_size
    f, n = m.num_filters, m.num_landmarks
    key = jax.random.key(0)
    rows = []

    def add(name, count, fn, x_shape, w_shape):
        x = jax.random.normal(key, x_shape, jnp.float32)
        w = jax.random.normal(key, w_shape, jnp.float32) * 0.01
        fwd, dx, dw = _parts(fn, x, w)
        rows.append({"layer": name, "count": count, "fwd_ms": fwd, "dx_ms": dx, "dw_ms": dw,
                     "total_fwd_ms": fwd * count, "total_bwd_ms": (dx + dw) * count})

    if m.local_5x5_layers:
        add("conv5x5 1->F (first)", 1, _conv(1), (b, s, s, 1), (5, 5, 1, f))
        add("conv5x5 F->F", m.local_5x5_layers - 1, _conv(1), (b, s, s, f), (5, 5, f, f))
    add("conv3x3 F->F", m.local_3x3_layers, _conv(1), (b, s, s, f), (3, 3, f, f))
    if m.global_layers:
        d = m.global_dilation
        add(f"conv3x3 dil{d} 2L->F", 1, _conv(d), (b, s, s, 2 * n), (3, 3, 2 * n, f))
        add(f"conv3x3 dil{d} F->F", m.global_layers - 1, _conv(d), (b, s, s, f), (3, 3, f, f))
        if s % d == 0:  # what the network runs instead (execution.dilation_as_phases); here transformed per layer
            add(f"conv3x3 dil{d} F->F on phases", m.global_layers - 1,
                lambda x, w: network.from_phases(_conv(1)(network.to_phases(x, d), w), d), (b, s, s, f), (3, 3, f, f))
    kernel = network.model_kernel(m)
    add("kernel_conv (blur) 2L", 1, lambda x, w: lgcn_jax.kernel_conv(x, kernel) * w, (b, s, s, 2 * n), ())
    # What the blur would cost at the convolutions' precision (TF32 on a GPU; the same on a CPU).
    add("kernel_conv 2L, DEFAULT prec", 1, lambda x, w: lgcn_jax.kernel_conv(x, kernel, precision=None) * w,
        (b, s, s, 2 * n), ())

    # The library's form before (two einsums with layout transposes on a GPU), to time the two in one run.
    add("kernel_conv 2L, einsum form (before), DEFAULT prec", 1, lambda x, w: blur_einsum(x, kernel) * w,
        (b, s, s, 2 * n), ())

    def bn_relu_dropout(fused):
        def f(x, scale):
            block = BNReLUDropout(m.bn_momentum, m.bn_epsilon, m.activation_scale, m.dropout_rate, fused=fused)
            variables = {"params": {"scale": scale, "bias": jnp.zeros_like(scale)},
                         "batch_stats": {"mean": jnp.zeros_like(scale), "var": jnp.ones_like(scale)}}
            return block.apply(variables, x, True, rngs={"dropout": jax.random.key(1)}, mutable=["batch_stats"])[0]
        return f
    blocks = m.local_5x5_layers + m.local_3x3_layers + m.global_layers
    add("BatchNorm+ReLU+dropout F", blocks, bn_relu_dropout(True), (b, s, s, f), (f,))
    add("  the same, autodiff", blocks, bn_relu_dropout(False), (b, s, s, f), (f,))
    return rows


def cost(fn, *args) -> dict:
    try:
        c = jax.jit(fn).lower(*args).compile().cost_analysis()
        c = c[0] if isinstance(c, (list, tuple)) else c
        return {"flops": float(c.get("flops", float("nan"))), "bytes_accessed": float(c.get("bytes accessed", float("nan")))}
    except Exception as e:  # cost analysis is best effort on some backends
        return {"error": f"{type(e).__name__}: {e}"}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="paper")
    p.add_argument("--config", nargs="*", default=[])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--parts", help=f"comma-separated subset of the whole-step timings (default all: {','.join(PARTS)})")
    p.add_argument("--no_layers", action="store_true", help="skip the per-layer breakdown")
    p.add_argument("--no_cost", action="store_true", help="skip XLA's cost analysis (two more compilations)")
    p.add_argument("--trace", help="also write a jax.profiler trace of 3 train steps to this folder")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results_profile.json"))
    args = p.parse_args(argv)
    cfg = lgcn_jax.apply_overrides(lgcn_jax.get_config(args.preset), [*args.config, f"train.batch_size={args.batch}"])
    b, s = args.batch, cfg.data.image_size
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.random((b, s, s, 1), np.float32))
    landmarks = jnp.asarray(rng.uniform(0.2 * s, 0.8 * s, (b, cfg.model.num_landmarks, 2)).astype(np.float32))
    raw = {"image": jnp.asarray((rng.random((b, s, s, 1)) * 255).astype(np.uint8)), "landmarks": landmarks,
           "example": jnp.arange(b, dtype=jnp.int32)}
    batch = {"image": images, "landmarks": landmarks}
    state = create_train_state(cfg)
    loss_scale = cfg.train.loss_scale
    grad_fn = jax.jit(jax.value_and_grad(step.loss, has_aux=True), static_argnums=4)
    fwd_train = jax.jit(lambda n, x: network.apply_train(n, x, jax.random.key(0))[1])
    parts = set(args.parts.split(",")) if args.parts else set(PARTS)
    if parts - set(PARTS):
        p.error(f"unknown --parts {sorted(parts - set(PARTS))}; choose from {','.join(PARTS)}")

    def steps(batch, augment):
        nonlocal state
        state, m = step.train_step(state, batch, loss_scale, augment)
        return m

    def step_with(**execution):  # the step run another way (ExecutionConfig), same weights
        nonlocal state
        run = state.net.execution
        state = state.replace(net=state.net.with_execution(dataclasses.replace(run, **execution)))
        try:
            return median_time(lambda: steps(batch, None), repeats=args.repeats)
        finally:
            state = state.replace(net=state.net.with_execution(run))

    def apply_with(**execution):  # inference run another way, same weights
        return median_time(lgcn_jax.apply, state.net.with_execution(dataclasses.replace(state.net.execution, **execution)), images,
                           repeats=args.repeats)

    # Every timer reads state.net when it runs: train_step donates the arrays of the state it is given.
    timers = {"apply": lambda: median_time(lgcn_jax.apply, state.net, images, repeats=args.repeats),
              # BatchNorm not folded into the convolutions for inference (execution.fold_batch_norm=false)
              "apply_unfolded_bn": lambda: apply_with(fold_batch_norm=False),
              "forward_train_mode": lambda: median_time(fwd_train, state.net, images, repeats=args.repeats),
              "loss_and_grads": lambda: median_time(grad_fn, state.net.params, state.net, batch, jax.random.key(0), loss_scale, repeats=args.repeats),
              "train_step": lambda: median_time(lambda: steps(batch, None), repeats=args.repeats),
              "train_step_device_augment": lambda: median_time(lambda: steps(raw, DataConfig(image_size=s)), repeats=args.repeats),
              # the global subnet as dilated convolutions (execution.dilation_as_phases=false)
              "train_step_dilated_convs": lambda: step_with(dilation_as_phases=False),
              # BatchNorm -> ReLU -> dropout left to autodiff (execution.fused_batch_norm=false)
              "train_step_unfused_bn": lambda: step_with(fused_batch_norm=False),
              # bf16 convolution blocks (execution.compute_dtype)
              "apply_bf16": lambda: apply_with(compute_dtype="bfloat16"),
              "train_step_bf16": lambda: step_with(compute_dtype="bfloat16")}
    m = cfg.model
    if not (cfg.execution.dilation_as_phases and m.global_dilation > 1 and s % m.global_dilation == 0):
        parts.discard("train_step_dilated_convs")  # the network runs dilated convolutions anyway
    r = {k: timers[k]() for k in PARTS if k in parts}
    result = {"machine": machine(), "preset": args.preset, "overrides": args.config, "batch": b, "image_size": s,
              "seconds": r, "images_per_s": {k: b / v for k, v in r.items()},
              "over_apply": {k: v / r["apply"] for k, v in r.items()} if "apply" in r else {},
              "xla_cost": {} if args.no_cost else {
                  "apply": cost(lgcn_jax.apply, state.net, images),
                  "loss_and_grads": cost(lambda p: jax.value_and_grad(step.loss, has_aux=True)(p, state.net, batch, jax.random.key(0), loss_scale),
                                         state.net.params)}}
    print(f"{result['machine']['device']}  {args.preset}  batch {b}  {s} px")
    for k, v in r.items():
        print(f"  {k:<28}{1e3 * v:10.2f} ms {b / v:10.1f} img/s" + (f"{v / r['apply']:7.2f}x apply" if "apply" in r else ""))
    if not args.no_layers:
        rows = layer_breakdown(cfg, b)
        result["layers"] = rows
        print(f"  {'layer':<28}{'n':>3}{'fwd ms':>10}{'dx ms':>10}{'dw ms':>10}{'sum fwd':>10}{'sum bwd':>10}")
        for row in rows:
            print(f"  {row['layer']:<28}{row['count']:>3}{row['fwd_ms']:>10.2f}{row['dx_ms']:>10.2f}{row['dw_ms']:>10.2f}"
                  f"{row['total_fwd_ms']:>10.2f}{row['total_bwd_ms']:>10.2f}")
    if args.trace:
        with jax.profiler.trace(args.trace):
            for _ in range(3):
                jax.block_until_ready(steps(batch, None))
        result["trace"] = os.path.abspath(args.trace)
        try:  # on an accelerator: where the kernel time of those 3 steps went
            result["trace_summary"] = trace_summary.summarize(args.trace, steps=3)
            trace_summary.print_summary(result["trace_summary"])
        except trace_summary.TraceError as e:
            print(f"  trace summary: {e}")
    return write_results(result, args.out)


if __name__ == "__main__":
    main()
