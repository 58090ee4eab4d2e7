"""The benchmarks run end to end on tiny sizes (no timing is asserted: numbers mean nothing here).

The scripts run as a user runs them (a subprocess); only the unit tests of the benchmarks' own helpers
(trace and HLO parsing, the profiler's parts) import bench/ modules.  bench/ never imports tests/.
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))


def test_run_all_tiny(tmp_path, synthetic_data_dir):
    out = tmp_path / "results.json"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "run_all.py"), "--tiny", "--data_dir", synthetic_data_dir,
                        "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| kernel conv forward B=1 |" in r.stdout
    r = json.loads(out.read_text())
    assert [row["pass"] for row in r["kernel_conv"]["rows"]] == ["forward", "backward"]
    assert all(row["rel_err"] < 1e-5 for row in r["kernel_conv"]["rows"])
    assert [row["batch"] for row in r["network"]["rows"]] == [2]
    assert r["network"]["flops_per_image"]["total"] > 0
    assert [row["stages"] for row in r["postprocess"]["rows"]] == ["arg-max only", "full (global+20+7+blend)"]
    assert r["train"]["verdict"] in ("input-bound", "compute-bound")
    assert set(r["memory"]) == {"predict", "train"} and all(v["peak_rss_mib"] > 0 for v in r["memory"].values())
    for part in ("kernel_conv", "network", "postprocess", "train"):
        assert (tmp_path / f"results_{part}.json").exists()


def test_bench_train_runs_without_tensorflow(tmp_path):
    """On a machine without TensorFlow (the GPU box) the synthetic faces are generated in memory."""
    import subprocess

    root = ROOT
    code = ("import sys, json; sys.modules['tensorflow'] = None; sys.modules['tensorflow_datasets'] = None; "
            f"sys.path.insert(0, {os.path.join(root, 'bench')!r}); import bench_train; "
            "r = bench_train.main(['--config', 'model.num_filters=4', 'model.local_5x5_layers=1', 'model.local_3x3_layers=1', "
            "'model.global_layers=1', 'model.kernel_size=9', 'data.image_size=32', 'train.batch_size=2', '--steps', '1', "
            f"'--pipeline_batches', '2', '--faces', '8', '--data_dir', {str(tmp_path / 'none')!r}, '--out', {str(tmp_path / 'r.json')!r}]); "
            "print(json.dumps([r['pipeline'], r['data']]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == ["jax", "8 synthetic faces generated in memory"]


def _write_trace(path, events):
    import gzip

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)


def test_trace_summary_sums_device_kernels_by_kind_and_layer(tmp_path):
    """bench/trace_summary.py on a hand-made GPU trace of 2 steps: only device kernels count, each
    in its kind and layer, per step; a CPU-only trace and a missing one are refused by name."""
    import trace_summary

    fwd, bwd = "jit(_train_step)/jvp(LGCN)/local5_0_conv/conv_general_dilated", "jit(_train_step)/transpose(jvp(LGCN))/local5_0_conv/conv_general_dilated"
    meta = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "name": "process_name", "pid": 7, "args": {"name": "/host:CPU"}}]
    kernels = [("sm90_xmma_fprop_implicit_gemm_tf32", fwd, 2000), ("void cudnn::nchwToNhwcKernel<float>", fwd, 200),
               ("sm90_xmma_wgrad_indexed_implicit_gemm", bwd, 3000), ("sm90_xmma_dgrad_implicit_gemm", bwd, 1000),
               ("loop_select_fusion", "", 500), ("sm80_xmma_gemm_f32f32_cublas", "", 300)]
    events = meta + [{"ph": "X", "pid": 1, "name": k, "dur": d, "args": {"name": n} if n else {}} for k, n, d in kernels * 2]
    events.append({"ph": "X", "pid": 7, "name": "PjitFunction(_train_step)", "dur": 10**6})  # host time: not counted
    _write_trace(str(tmp_path / "gpu" / "plugins" / "profile" / "run" / "vm.trace.json.gz"), events)
    s = trace_summary.summarize(str(tmp_path / "gpu"), steps=2, top=3)
    assert s["device"] == ["/device:GPU:0"] and s["total_ms"] == 7.0
    assert s["by_kind_ms"] == {"conv forward": 2.0, "conv input gradient": 1.0, "conv weight gradient": 3.0, "matmul": 0.3,
                               "layout": 0.2, "fusion": 0.5}
    assert s["by_layer"] == [{"layer": "local5_0_conv", "forward_ms": 2.2, "backward_ms": 4.0, "total_ms": 6.2}]
    assert [(k["kind"], k["pass"], k["calls_per_step"], k["ms"]) for k in s["top_kernels"]] == [
        ("conv weight gradient", "backward", 1.0, 3.0), ("conv forward", "forward", 1.0, 2.0), ("conv input gradient", "backward", 1.0, 1.0)]

    _write_trace(str(tmp_path / "cpu" / "x.trace.json.gz"), meta[1:] + [events[-1]])
    with pytest.raises(trace_summary.TraceError, match="no accelerator kernels"):
        trace_summary.summarize(str(tmp_path / "cpu"))
    with pytest.raises(trace_summary.TraceError, match="no \\*.trace.json.gz below it"):
        trace_summary.summarize(str(tmp_path / "none"))


def test_profile_train_step_tiny(tmp_path):
    """The profiler runs end to end on a tiny network, and its earlier form of the blur computes the library's blur."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import profile_train_step
    from lgcn_jax import kernel_conv
    from lgcn_jax.kernel_conv import Kernel, gaussian_mixture_kernel

    kernel = Kernel(gaussian_mixture_kernel(9, (0.3, 0.7), (1.0, 2.5)))
    x = jax.random.normal(jax.random.key(0), (2, 12, 10, 3))
    want = kernel_conv(x, kernel)
    got = profile_train_step.blur_einsum(x, kernel, jax.lax.Precision.HIGHEST)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))
    ct = jax.random.normal(jax.random.key(1), x.shape)
    g_want = jax.grad(lambda x: jnp.vdot(kernel_conv(x, kernel), ct))(x)
    g_got = jax.grad(lambda x: jnp.vdot(profile_train_step.blur_einsum(x, kernel, jax.lax.Precision.HIGHEST), ct))(x)
    np.testing.assert_allclose(g_got, g_want, rtol=1e-5, atol=1e-5 * float(jnp.abs(g_want).max()))

    out = tmp_path / "profile.json"
    r = profile_train_step.main(["--preset", "quick", "--batch", "2", "--repeats", "1", "--parts", "train_step,apply,apply_unfolded_bn,apply_bf16,train_step_bf16,train_step_unfused_bn",
                                 "--no_cost", "--config", "model.num_filters=4", "model.local_3x3_layers=1",
                                 "model.global_layers=2", "model.kernel_size=9", "data.image_size=16", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert set(saved["seconds"]) == {"apply", "apply_unfolded_bn", "train_step", "apply_bf16", "train_step_bf16", "train_step_unfused_bn"}
    layers = [row["layer"] for row in saved["layers"]]
    assert "kernel_conv 2L, einsum form (before), DEFAULT prec" in layers and "kernel_conv (blur) 2L" in layers
    assert "BatchNorm+ReLU+dropout F" in layers and "  the same, autodiff" in layers
    assert all(row["fwd_ms"] > 0 for row in saved["layers"])
    assert r is not None and saved["machine"]["device"]


def test_gpu_checks_script_refuses_before_running(tmp_path):
    """bench/gpu_checks.sh: an unknown stage prints its usage; results already in $OUT are never overwritten
    (both before any Python starts).  TINY=1 runs the stages themselves; a GPU box is their place."""
    import subprocess

    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "gpu_checks.sh")
    env = {**os.environ, "OUT": str(tmp_path)}
    r = subprocess.run(["bash", script, "sped"], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "usage: bash bench/gpu_checks.sh speed | bf16 EXPORT_DIR" in r.stderr
    for stage, mine in (("speed", "trace.tgz"), ("bf16", "params.msgpack.part_aa")):
        (tmp_path / mine).write_text("earlier results")
        r = subprocess.run(["bash", script, stage, str(tmp_path / "export")], capture_output=True, text=True, env=env)
        assert r.returncode == 1 and f"{tmp_path / mine} exists; move it away" in r.stderr, r.stderr
        assert (tmp_path / mine).read_text() == "earlier results"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.msgpack.part_aa", "trace.tgz"]


HLO = """HloModule m, entry_computation_layout={(f32[8,16]{1,0})->f32[16,8]{1,0}}

%fused_t (p: f32[8,16]) -> f32[16,8] {
  %p = f32[8,16]{1,0} parameter(0)
  ROOT %t = f32[16,8]{1,0} transpose(%p), dimensions={1,0}
}

%fused_add (p.1: f32[16,8], p.2: pred[16,8]) -> (f32[16,8], f32[16]) {
  %p.1 = f32[16,8]{1,0} parameter(0)
  ROOT %a = f32[16,8]{1,0} add(%p.1, %p.1)
}

%command_buffer (q: f32[16,8]) -> f32[16,8] {
  %q = f32[16,8]{1,0} parameter(0)
  %m = pred[16,8]{1,0} parameter(1)
  ROOT %loop_add_fusion = f32[16,8]{1,0} fusion(%q, %m), kind=kLoop, calls=%fused_add
}

ENTRY %main (x: f32[8,16]) -> f32[16,8] {
  %x = f32[8,16]{1,0} parameter(0)
  %w = f32[3,3,8,8]{3,2,1,0} constant({...})
  %conv = (f32[8,16]{1,0}, u8[0]{0}) custom-call(%x, %w), custom_call_target="__cudnn$convForward", backend_config={}
  %g = f32[8,16]{1,0} get-tuple-element(%conv), index=0
  %input_transpose_fusion = f32[16,8]{1,0} fusion(%g), kind=kInput, calls=%fused_t
  ROOT %c = f32[16,8]{1,0} call(%input_transpose_fusion), to_apply=%command_buffer
}
"""


def test_gpu_hlo_offline_counts_bytes_by_kind():
    """The byte count of a compiled module: each kernel's operands and results, parameters and views free,
    command buffers entered, kinds by library call and fusion."""
    import gpu_hlo_offline as g

    assert g.type_bytes("(f32[2,3]{1,0}, pred[4]{0}, bf16[5])") == 24 + 4 + 10
    kinds, kernels = g.traffic(HLO)
    assert [k["name"] for k in kernels] == ["conv", "input_transpose_fusion", "loop_add_fusion"]
    assert kinds == {"convolution forward (cuDNN)": {"kernels": 1, "bytes": 512 + 512 + 4 * 72 * 8},
                     "layout transpose fusion": {"kernels": 1, "bytes": 512 + 512},
                     "element-wise fusion (kLoop)": {"kernels": 1, "bytes": 512 + 512 + 128}}
    with pytest.raises(ValueError, match="ENTRY"):
        g.traffic("HloModule empty")


def test_gpu_hlo_offline_parses_a_real_module():
    """XLA's own text (here the CPU's compile of a small step) parses: every kernel found, none negative."""
    import jax
    import jax.numpy as jnp

    import gpu_hlo_offline as g

    def f(x, w):
        return jax.grad(lambda w: jnp.sum(jax.nn.relu(x @ w).T ** 2))(w)

    text = jax.jit(f).lower(jnp.ones((64, 32)), jnp.ones((32, 16))).compile().as_text()
    kinds, kernels = g.traffic(text)
    assert kernels and all(k["bytes"] > 0 for k in kernels)
    assert sum(v["bytes"] for v in kinds.values()) >= 64 * 32 * 4  # x is read at least once


def test_gpu_hlo_offline_names_the_missing_plugin():
    import subprocess

    try:
        import jax_plugins.xla_cuda12  # noqa: F401
        pytest.skip("JAX's CUDA plugin is installed here")
    except ImportError:
        pass
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "gpu_hlo_offline.py")
    r = subprocess.run([sys.executable, script, "--out", os.devnull], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and 'pip install "jax[cuda12]==' in r.stderr


def test_generated_docs_are_up_to_date():
    """docs/benchmarks.md and the README's table of weights are what bench/make_docs.py makes of bench/results*.json
    (no number in them is written by hand); a stale one names itself."""
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "make_docs.py"), "--check"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
