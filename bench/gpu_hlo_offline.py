"""What a GPU would run, without a GPU: the training step (or ``apply``) compiled for an NVIDIA H200 here, its memory traffic by kind.

    pip install "jax[cuda12]==$(python -c 'import jax; print(jax.__version__)')"   # the CUDA plugin; no GPU or driver needed
    python bench/gpu_hlo_offline.py [--function train_step|apply] [--preset paper] [--batch 64] [--config k=v ...]
                                    [--variant k=v[,k=v] ...] [--out FILE]

XLA compiles for a GPU it does not have from a target description (``bench/gpu_specs/h200.txtpb``,
``--target``): the fusions, the layouts, every layout transpose and which library (cuDNN, cuBLAS)
runs each convolution and matmul are XLA's own decisions for that chip.  What differs from a
compile on the GPU: nothing is autotuned (no convolution algorithm is picked) and Triton GEMM
fusions are off (cuBLAS calls instead; deviceless Triton tiling fails on the blur's matmuls).

For every top-level kernel of the compiled function it sums the bytes of its operands and results and
groups them by kind: cuDNN convolutions (forward, input and weight gradients), cuBLAS matmuls,
layout transposes, and XLA's element-wise (kLoop) and reduction (kInput) fusions.  Element-wise and
transpose kernels are memory-bound, so their bytes are what their time follows; on the H200 trace
of the step (bench/results_profile.json, commit 3fdc0de) the element-wise and reduction fusions
moved 80.9 GB by this count in 23.1 ms (3.5 TB/s).  Each ``--variant`` (execution fields of the model, e.g.
``execution.fused_batch_norm=false``) is compiled in the same run for a ratio against the default.
Writes bench/results_gpu_hlo_offline.json (``_apply.json`` for apply).  No timing: this says what moves, not how fast.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

HERE = os.path.dirname(os.path.abspath(__file__))
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
          "f64": 8, "s64": 8, "u64": 8}
_SHAPE = re.compile(r"\b(" + "|".join(_BYTES) + r")\[([0-9,]*)\]")
# "  [ROOT ]%name = TYPE opcode(operands), attributes"; TYPE is an array or a tuple of arrays.
_INSTRUCTION = re.compile(r"^\s+(?:ROOT )?%(\S+) = (\(.*?\)|\w+\[[0-9,]*\](?:\{[^}]*\})?) ([a-z\-]+)\((.*?)\)(.*)$")
_FREE = {"parameter", "get-tuple-element", "bitcast", "tuple", "constant", "after-all", "partition-id", "replica-id",
         "copy-start", "copy-done"}
_LIBRARY = {"__cudnn$convForward": "convolution forward (cuDNN)", "__cudnn$convBiasActivationForward": "convolution forward (cuDNN)",
            "__cudnn$convBackwardInput": "convolution input gradient (cuDNN)",
            "__cudnn$convBackwardFilter": "convolution weight gradient (cuDNN)",
            "__cublas$gemm": "matmul (cuBLAS)", "__cublas$lt$matmul": "matmul (cuBLAS)"}


def type_bytes(text: str) -> int:
    """Bytes of every array in an HLO type string, e.g. ``(f32[2,3]{1,0}, pred[4])`` -> 28."""
    total = 0
    for dtype, dims in _SHAPE.findall(text):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * _BYTES[dtype]
    return total


def parse_hlo(text: str) -> dict[str, list[dict]]:
    """Computations of an HLO module's text: {name: [instruction dicts]}; the entry also under ``"ENTRY"``."""
    computations, current = {}, None
    for line in text.splitlines():
        if line.startswith("ENTRY ") or (line.startswith("%") and line.rstrip().endswith("{")):
            name = (line.split()[1] if line.startswith("ENTRY ") else line.split()[0]).lstrip("%")
            current = computations.setdefault(name, [])
            if line.startswith("ENTRY "):
                computations["ENTRY"] = current
        elif line.startswith("}"):
            current = None
        elif current is not None and (m := _INSTRUCTION.match(line)):
            current.append({"name": m.group(1), "type": m.group(2), "op": m.group(3), "operands": m.group(4), "attrs": m.group(5)})
    if "ENTRY" not in computations:
        raise ValueError("no ENTRY computation in this HLO text")
    return computations


def kernel_kind(ins: dict, computations: dict) -> str:
    op, attrs = ins["op"], ins["attrs"]
    if op == "custom-call":
        target = re.search(r'custom_call_target="([^"]+)"', attrs)
        return _LIBRARY.get(target.group(1) if target else "", f"custom call {target.group(1) if target else '?'}")
    if op == "fusion":
        called = re.search(r"calls=%([\w.\-]+)", attrs)
        body = computations.get(called.group(1), []) if called else []
        if "transpose" in ins["name"] or any(i["op"] == "transpose" for i in body):
            return "layout transpose fusion"
        fusion_kind = re.search(r"kind=(k\w+)", attrs)
        return {"kLoop": "element-wise fusion (kLoop)", "kInput": "reduction fusion (kInput)"}.get(
            fusion_kind.group(1) if fusion_kind else "", f"fusion {fusion_kind.group(1) if fusion_kind else '?'}")
    return op  # copy, transpose, sort, ...


def traffic(text: str) -> tuple[dict[str, dict], list[dict]]:
    """Per kind {"kernels", "bytes"} over the entry's kernels (into called command buffers and loops), and every kernel."""
    computations = parse_hlo(text)
    types = {i["name"]: i["type"] for body in computations.values() for i in body}
    kinds: dict[str, dict] = collections.defaultdict(lambda: {"kernels": 0, "bytes": 0})
    kernels = []

    def visit(body, depth=0):
        for ins in body:
            if ins["op"] in _FREE:
                continue
            if ins["op"] in ("call", "while", "conditional", "async-start"):
                branches = re.search(r"branch_computations=\{([^}]*)\}", ins["attrs"])
                names = re.findall(r"(?:to_apply|body|calls)=%([\w.\-]+)", ins["attrs"]) + (
                    re.findall(r"%([\w.\-]+)", branches.group(1)) if branches else [])
                for name in names:
                    if depth < 8:
                        visit(computations.get(name, []), depth + 1)
                continue
            operands = re.findall(r"%([\w.\-]+)", ins["operands"])
            nbytes = type_bytes(ins["type"]) + sum(type_bytes(types.get(o, "")) for o in operands)
            kind = kernel_kind(ins, computations)
            kinds[kind]["kernels"] += 1
            kinds[kind]["bytes"] += nbytes
            kernels.append({"name": ins["name"], "kind": kind, "bytes": nbytes, "type": ins["type"][:80]})

    visit(computations["ENTRY"])
    return dict(kinds), kernels


def compile_text(function: str, cfg, batch: int, target_config: str) -> str:
    """Optimized HLO text of ``train_step`` or ``apply`` for the described GPU, compiled on this machine's CPU."""
    import jax
    import jax.numpy as jnp
    from jax.experimental import topologies

    from lgcn_jax import network, step, train_state

    topology = topologies.get_topology_desc(platform="cuda", target_config=target_config, topology="1x1x1")
    sharding = jax.sharding.SingleDeviceSharding(topology.devices[0])
    on_gpu = lambda t: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), t)  # noqa: E731
    s = cfg.data.image_size
    images = jax.ShapeDtypeStruct((batch, s, s, 1), jnp.float32, sharding=sharding)
    if function == "apply":
        net = jax.eval_shape(lambda: network.init(jax.random.key(0), cfg))
        return network._apply.lower(on_gpu(net), images).compile().as_text()
    state = jax.eval_shape(lambda: train_state.create_train_state(cfg))
    batch_spec = {"image": images,
                  "landmarks": jax.ShapeDtypeStruct((batch, cfg.model.num_landmarks, 2), jnp.float32, sharding=sharding)}
    lowered = step._train_step.lower(on_gpu(state), batch_spec, cfg.train.loss_scale, None)
    return lowered.compile().as_text()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="paper")
    p.add_argument("--config", nargs="*", default=[])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--function", choices=("train_step", "apply"), default="train_step")
    p.add_argument("--variant", action="append", default=[],
                   help="comma-separated overrides compiled beside the default, e.g. execution.fused_batch_norm=false")
    p.add_argument("--target", default=os.path.join(HERE, "gpu_specs", "h200.txtpb"), help="XLA GPU target description")
    p.add_argument("--top", type=int, default=10, help="list the largest kernels that are not convolutions or matmuls")
    p.add_argument("--hlo_dir", help="also write each compiled module's HLO text here")
    p.add_argument("--out", help="default bench/results_gpu_hlo_offline.json, for apply bench/results_gpu_hlo_offline_apply.json")
    args = p.parse_args(argv)
    args.out = args.out or os.path.join(HERE, "results_gpu_hlo_offline" + ("_apply" if args.function == "apply" else "") + ".json")
    # Deviceless: JAX runs on the CPU, XLA's GPU compiler only compiles.  Triton's GEMM tiling needs a device.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_triton_gemm=false").strip()
    import jax

    jax.config.update("jax_platforms", "cpu")
    try:
        import jax_plugins.xla_cuda12  # noqa: F401
    except ImportError:
        sys.exit("bench/gpu_hlo_offline.py needs JAX's CUDA plugin (no GPU needed): "
                 f'pip install "jax[cuda12]=={jax.__version__}"')
    import lgcn_jax
    from common import machine, write_results

    with open(args.target) as f:
        target_config = f.read()
    device = re.search(r'device_description_str: "([^"]*)"', target_config)
    runs = {"default": []} | {v: v.split(",") for v in args.variant}
    result = {"target": device.group(1) if device else os.path.basename(args.target), "compiled_on": machine(),
              "jax": jax.__version__, "function": args.function, "preset": args.preset, "overrides": args.config, "batch": args.batch, "variants": {}}
    for name, extra in runs.items():
        cfg = lgcn_jax.apply_overrides(lgcn_jax.get_config(args.preset), [*args.config, *extra, f"train.batch_size={args.batch}"])
        text = compile_text(args.function, cfg, args.batch, target_config)
        if args.hlo_dir:
            os.makedirs(args.hlo_dir, exist_ok=True)
            with open(os.path.join(args.hlo_dir, re.sub(r"[^\w.=-]+", "_", name) + ".hlo"), "w") as f:
                f.write(text)
        kinds, kernels = traffic(text)
        total = sum(k["bytes"] for k in kinds.values())
        others = sorted((k for k in kernels if "cuDNN" not in k["kind"] and "cuBLAS" not in k["kind"]), key=lambda k: -k["bytes"])
        result["variants"][name] = {"total_gb": total / 1e9, "kinds": {k: {"kernels": v["kernels"], "gb": v["bytes"] / 1e9}
                                                                       for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]["bytes"])},
                                    "largest_other": [{**k, "gb": k.pop("bytes") / 1e9} for k in others[: args.top]]}
    base = result["variants"]["default"]
    print(f"{args.function} compiled for {result['target']} on this CPU: {args.preset}, batch {args.batch}, GB moved per call")
    for name, r in result["variants"].items():
        print(f"\n{name}: {r['total_gb']:.2f} GB" + ("" if name == "default" else f" ({r['total_gb'] / base['total_gb']:.3f}x default)"))
        for kind, v in r["kinds"].items():
            print(f"  {kind:<40}{v['kernels']:>6}{v['gb']:>10.2f}")
    print("\nlargest kernels of the default that are not convolutions or matmuls:")
    for k in base["largest_other"]:
        print(f"  {k['gb']:7.3f} GB  {k['kind']:<30} {k['type']}")
    return write_results(result, args.out)


if __name__ == "__main__":
    main()
