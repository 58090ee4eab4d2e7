"""Where the device time of a traced step goes, per kind of kernel and per layer.

    python bench/trace_summary.py TRACE_DIR [--steps 3] [--top 12] [--out summary.json]

Reads the newest ``*.trace.json.gz`` that ``jax.profiler.trace(TRACE_DIR)`` wrote (what
``profile_train_step.py --trace`` writes) and sums the kernels that ran on the accelerator, divided
by ``--steps``:

  * by kind: convolution forward / input gradient / weight gradient (cuDNN kernel names), matmuls,
    layout conversions and transposes, other fused element-wise and reduction kernels;
  * by layer: the flax module a kernel belongs to (``local5_1_conv``, ``global_0_bn`` ...), forward
    and backward apart, as JAX names the ops (``transpose(jvp(...))`` is the backward pass);
  * the kernels that took longest.

Only device kernels count: a trace of a CPU run has none, and is refused with a message.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys

KINDS = ("conv forward", "conv input gradient", "conv weight gradient", "matmul", "layout", "fusion", "copy", "other")


class TraceError(ValueError):
    pass


def newest_trace(path: str) -> str:
    """The newest ``*.trace.json.gz`` under a trace folder (or the file itself)."""
    if os.path.isfile(path):
        return path
    files = glob.glob(os.path.join(path, "**", "*.trace.json.gz"), recursive=True)
    if not files:
        raise TraceError(f"{path}: no *.trace.json.gz below it; write one with jax.profiler.trace({path!r}) "
                         "or bench/profile_train_step.py --trace")
    return max(files, key=os.path.getmtime)


def kernel_kind(kernel: str, hlo_op: str = "") -> str:
    """The kind of one device kernel, from its name (cuDNN/cuBLAS/XLA naming) and its HLO op."""
    k = kernel.lower()
    if "wgrad" in k:
        return "conv weight gradient"
    if "dgrad" in k:
        return "conv input gradient"
    if "fprop" in k or "conv" in hlo_op.lower() and ("xmma" in k or "implicit_gemm" in k):
        return "conv forward"
    if "nchwtonhwc" in k or "nhwctonchw" in k or "converttensor" in k or "transpose" in k:
        return "layout"
    if "gemm" in k or "cublas" in k or "dot" in k:
        return "matmul"
    if "fusion" in k:
        return "fusion"
    if "memcpy" in k or "memset" in k or k.startswith("copy"):
        return "copy"
    return "other"


_SCOPE = re.compile(r"(?:\w+\()*[A-Z]\w*\)*")


def layer_of(op_name: str) -> tuple[str, str]:
    """(layer, "forward" | "backward") of a JAX op path such as
    ``jit(_train_step)/transpose(jvp(LGCN))/local5_1_conv/conv_general_dilated``; ("", "") if none."""
    parts = op_name.split("/")
    direction = "backward" if any(p.startswith("transpose(") for p in parts) else "forward"
    # The component after the model's own scope (a capitalised flax module name such as "LGCN",
    # possibly wrapped as jvp(LGCN) or transpose(jvp(LGCN))).
    for i, p in enumerate(parts[:-1]):
        if _SCOPE.fullmatch(p):
            return parts[i + 1], direction
    return "", ""


def summarize(path: str, steps: int = 1, top: int = 12) -> dict:
    """Device time per step of a trace: totals by kind, by layer (forward / backward) and the top kernels, in ms."""
    file = newest_trace(path)
    try:
        with gzip.open(file, "rt") as f:
            events = json.load(f)["traceEvents"]
    except (OSError, ValueError, KeyError) as e:
        raise TraceError(f"{file}: not a readable trace ({type(e).__name__}: {e})") from e
    names = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    devices = {pid for pid, name in names.items() if "/device:" in name and "CPU" not in name.upper()}
    kernels = [e for e in events if e.get("ph") == "X" and e.get("pid") in devices and "dur" in e]
    if not kernels:
        raise TraceError(f"{file}: no accelerator kernels in this trace (a CPU run has none); processes: {sorted(names.values())}")
    by_kind = collections.Counter()
    by_layer = collections.defaultdict(collections.Counter)
    by_kernel = collections.Counter()
    count = collections.Counter()
    for e in kernels:
        ms = e["dur"] / 1e3 / steps
        args = e.get("args", {})
        kind = kernel_kind(e["name"], args.get("hlo_op", ""))
        by_kind[kind] += ms
        layer, direction = layer_of(args.get("name", ""))
        if layer:
            by_layer[layer][direction] += ms
        key = (kind, layer or "-", direction or "-", e["name"][:90])
        by_kernel[key] += ms
        count[key] += 1
    total = sum(by_kind.values())
    layers = sorted(({"layer": k, "forward_ms": round(v["forward"], 3), "backward_ms": round(v["backward"], 3),
                      "total_ms": round(v["forward"] + v["backward"], 3)} for k, v in by_layer.items()), key=lambda r: -r["total_ms"])
    return {
        "trace": file,
        "device": sorted(names[p] for p in devices),
        "steps": steps,
        "total_ms": round(total, 3),
        "by_kind_ms": {k: round(by_kind[k], 3) for k in KINDS if by_kind[k]},
        "by_layer": layers,
        "top_kernels": [{"kind": k[0], "layer": k[1], "pass": k[2], "kernel": k[3], "calls_per_step": count[k] / steps, "ms": round(v, 3)}
                        for k, v in by_kernel.most_common(top)],
    }


def print_summary(s: dict, top_layers: int = 12) -> None:
    print(f"{s['trace']}: {', '.join(s['device'])}, {s['total_ms']:.2f} ms of kernels per step ({s['steps']} steps)")
    for k, v in s["by_kind_ms"].items():
        print(f"  {k:<22}{v:9.2f} ms {100 * v / s['total_ms']:5.1f}%")
    print(f"  {'layer':<22}{'forward':>10}{'backward':>10}")
    for r in s["by_layer"][:top_layers]:
        print(f"  {r['layer']:<22}{r['forward_ms']:10.2f}{r['backward_ms']:10.2f}")
    for r in s["top_kernels"]:
        print(f"  {r['ms']:8.3f} ms  {r['calls_per_step']:5.1f}x  {r['kind']:<21}{r['layer']:<16}{r['pass']:<9}{r['kernel'][:60]}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("trace", help="a folder given to jax.profiler.trace, or a .trace.json.gz file")
    p.add_argument("--steps", type=int, default=1, help="how many steps the trace holds (times are divided by it)")
    p.add_argument("--top", type=int, default=12, help="how many of the longest kernels to list")
    p.add_argument("--out", help="also write the summary as JSON here")
    args = p.parse_args(argv)
    try:
        s = summarize(args.trace, args.steps, args.top)
    except TraceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print_summary(s)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(s, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
