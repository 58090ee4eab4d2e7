"""Network forward (`apply`) and `predict` (network + post-processing) throughput, FLOPs and the machine's peak.

    python bench/bench_network.py [--preset paper] [--batch 1 32]

FLOPs per image are counted from the layer table (every conv as 2 * H * W * k^2 * C_in * C_out;
the kernel convolution as the banded matmuls we execute on the maps the network blurs, and, for
comparison, as the direct 45x45 depthwise convolution it replaces).  The peak is measured in the same run: a square f32
matmul and a 3x3 convolution of the network's own width.  Writes bench/results_network.json.
"""

from __future__ import annotations

import argparse
import os

from common import machine, median_time, write_results

import jax
import numpy as np

import lgcn_jax
from lgcn_jax.network import model_kernel
from lgcn_jax.shape_model import build_shape_model


def count_flops(cfg: lgcn_jax.Config, size: int) -> dict:
    """Multiply-adds x 2 per image, by stage."""
    m = cfg.model
    hw, f, L = size * size, m.num_filters, m.num_landmarks
    conv = lambda k, cin, cout: 2 * hw * k * k * cin * cout  # noqa: E731
    local = conv(5, 1, f) + (m.local_5x5_layers - 1) * conv(5, f, f) + m.local_3x3_layers * conv(3, f, f)
    if m.local_5x5_layers == 0:
        local = conv(3, 1, f) + (m.local_3x3_layers - 1) * conv(3, f, f)
    heads = 2 * conv(1, f, L)
    rank = model_kernel(m).rank
    # The maps the network blurs: both heads, or (execution.blur_features) the features, a map of ones and the side head.
    maps = f + 1 + L if cfg.execution.blur_features and f + 1 < L else 2 * L
    blur_ours = 2 * rank * size * hw * maps  # a W-pass and an H-pass of every map
    blur_direct = 2 * (2 * hw * m.kernel_size ** 2 * L)
    glob = conv(3, 2 * L, f) + (m.global_layers - 1) * conv(3, f, f) + conv(1, f, L)
    return {"local": local, "heads": heads, "kernel_conv": blur_ours, "global": glob,
            "total": local + heads + blur_ours + glob, "kernel_conv_if_direct": blur_direct}


def peak_flops(width: int, repeats: int, n: int = 3072) -> dict:
    a = jax.random.normal(jax.random.key(0), (n, n))
    mm = jax.jit(lambda a: a @ a)
    t_mm = min(median_time(mm, a, repeats=max(repeats, 5)) for _ in range(2))
    x = jax.random.normal(jax.random.key(1), (8, 96, 96, width))
    w = jax.random.normal(jax.random.key(2), (3, 3, width, width))
    conv = jax.jit(lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
    t_conv = median_time(conv, x, w, repeats=max(repeats, 5))
    return {f"matmul_{n}_flops_per_s": 2 * n ** 3 / t_mm, f"conv3x3_{width}_flops_per_s": 2 * 8 * 96 * 96 * 9 * width * width / t_conv}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--preset", default="paper")
    p.add_argument("--config", nargs="*", default=[], help="overrides, e.g. model.num_filters=8 (smoke tests)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--peak_size", type=int, default=3072, help="side of the square matmul that measures the peak")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results_network.json"))
    args = p.parse_args(argv)
    cfg = lgcn_jax.apply_overrides(lgcn_jax.get_config(args.preset), args.config)
    size = cfg.data.image_size
    params = lgcn_jax.init(jax.random.key(0), cfg, image_size=size)
    from data_prep.synthetic_faces import make_face

    sm = build_shape_model(np.stack([make_face(s, size)[1] for s in range(64)]), size)
    flops = count_flops(cfg, size)
    peak = peak_flops(cfg.model.num_filters, args.repeats, args.peak_size)
    best_peak = max(peak.values())
    rows = []
    for b in args.batch:
        images = jax.random.uniform(jax.random.key(b), (b, size, size, 1))
        t_apply = median_time(lambda x: lgcn_jax.apply(params, x), images, repeats=args.repeats)
        t_pred = median_time(lambda x: lgcn_jax.predict(params, x, sm), images, repeats=args.repeats)
        achieved = flops["total"] * b / t_apply
        rows.append({"batch": b, "apply_s": t_apply, "apply_images_per_s": b / t_apply, "predict_s": t_pred,
                     "predict_images_per_s": b / t_pred, "apply_flops_per_s": achieved, "fraction_of_peak": achieved / best_peak})
        print(f"{args.preset} B={b:<3} apply {b / t_apply:8.2f} img/s ({t_apply * 1e3:8.1f} ms)   predict {b / t_pred:8.2f} img/s "
              f"({t_pred * 1e3:8.1f} ms)   {achieved / 1e9:6.1f} GFLOP/s = {100 * achieved / best_peak:5.1f}% of peak", flush=True)
    print(f"FLOPs/image: {flops['total'] / 1e9:.2f} G (local {flops['local'] / 1e9:.2f}, kernel conv {flops['kernel_conv'] / 1e9:.3f} "
          f"[direct would be {flops['kernel_conv_if_direct'] / 1e9:.2f}], global {flops['global'] / 1e9:.2f});  peak: "
          + ", ".join(f"{k} {v / 1e9:.1f} G" for k, v in peak.items()))
    result = {"machine": machine(), "preset": args.preset, "overrides": args.config, "image_size": size,
              "num_parameters": params.num_parameters(), "flops_per_image": flops, "peak": peak, "rows": rows}
    return write_results(result, args.out)


if __name__ == "__main__":
    main()
