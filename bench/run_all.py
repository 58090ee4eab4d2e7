"""Every benchmark in one run on this machine: prints a table and writes bench/results.json.

    python bench/run_all.py            # full sizes (about 10 minutes on a 2-core CPU)
    python bench/run_all.py --tiny     # seconds: tiny sizes, checks that everything runs

On a GPU: `pip install -e ".[cuda]"`, then the same command; the device is recorded in
the results.  Every ratio is measured within this run, after warm-up, as medians of repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench_kernel_conv  # noqa: E402
import bench_network  # noqa: E402
import bench_postprocess  # noqa: E402
import bench_train  # noqa: E402
from common import machine, write_results  # noqa: E402


def memory(what: str, args: list[str]) -> dict:
    """Peak RSS of one workload in a fresh process."""
    r = subprocess.run([sys.executable, os.path.join(HERE, "bench_memory.py"), what, *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"bench_memory.py {what} failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny sizes: a smoke run, numbers mean nothing")
    p.add_argument("--data_dir", help="TFDS data dir for the training benchmark (the synthetic set is built there if missing)")
    p.add_argument("--out", help="results file (default: bench/results.json; with --tiny a temporary folder, so that "
                                 "a smoke run never replaces the measured results)")
    args = p.parse_args(argv)
    if not args.out:
        args.out = os.path.join(tempfile.mkdtemp(prefix="lgcn_bench_tiny_"), "results.json") if args.tiny else os.path.join(HERE, "results.json")
    tmp = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(tmp, exist_ok=True)
    part = lambda name: os.path.join(tmp, f"results_{name}.json")  # noqa: E731
    data = ["--data_dir", args.data_dir] if args.data_dir else []
    if args.tiny:
        tiny_net = ["model.num_filters=4", "model.local_5x5_layers=1", "model.local_3x3_layers=1", "model.global_layers=1",
                    "model.kernel_size=9", "data.image_size=32"]
        runs = {
            "kernel_conv": lambda: bench_kernel_conv.main(["--batch", "1", "--size", "24", "--channels", "2", "--repeats", "1", "--out", part("kernel_conv")]),
            "network": lambda: bench_network.main(["--preset", "quick", "--config", *tiny_net, "--batch", "2", "--repeats", "1", "--peak_size", "256", "--out", part("network")]),
            "postprocess": lambda: bench_postprocess.main(["--batch", "2", "--size", "32", "--train_shapes", "30", "--repeats", "1", "--only_full", "--out", part("postprocess")]),
            "train": lambda: bench_train.main(["--config", *tiny_net, "train.batch_size=2", "--steps", "1", "--pipeline_batches", "2", *data, "--out", part("train")]),
        }
        mem = {"predict": ["--preset", "quick", "--batch", "2", "--config", *tiny_net], "train": ["--preset", "quick", "--batch", "2", "--config", *tiny_net]}
    else:
        runs = {
            "kernel_conv": lambda: bench_kernel_conv.main(["--batch", "1", "8", "32", "--out", part("kernel_conv")]),
            "network": lambda: bench_network.main(["--preset", "paper", "--batch", "1", "32", "--out", part("network")]),
            "postprocess": lambda: bench_postprocess.main(["--out", part("postprocess")]),
            "train": lambda: bench_train.main(["--preset", "quick", *data, "--out", part("train")]),
        }
        mem = {"predict": ["--preset", "paper", "--batch", "32"], "train": ["--preset", "quick", "--batch", "16"]}
    results = {"machine": machine(), "tiny": args.tiny}
    for name, run in runs.items():
        print(f"== {name}", flush=True)
        t = time.perf_counter()
        results[name] = run()
        print(f"   ({time.perf_counter() - t:.0f} s)", flush=True)
    print("== memory", flush=True)
    t = time.perf_counter()
    results["memory"] = {k: memory(k, v) for k, v in mem.items()}
    print(f"   ({time.perf_counter() - t:.0f} s)", flush=True)
    for k, v in results["memory"].items():
        print(f"peak RSS {k} ({v['preset']}, batch {v['batch']}): {v['peak_rss_mib']:.0f} MiB (after setup {v['baseline_rss_mib']:.0f} MiB)")
    print("\n" + summary(results))
    write_results(results, args.out)
    print(f"\nwritten {args.out}")
    return results


def summary(r: dict) -> str:
    lines = [f"device: {r['machine']['device']}  ({r['machine']['processor']}, {r['machine']['cpu_count']} CPUs)", ""]
    lines.append("| measurement | ours | reference | ratio |")
    lines.append("|---|---|---|---|")
    for row in r["kernel_conv"]["rows"]:
        lines.append(f"| kernel conv {row['pass']} B={row['batch']} | {row['ours_s'] * 1e3:.1f} ms | direct depthwise {row['direct_s'] * 1e3:.1f} ms | {row['speedup']:.0f}x |")
        if "per_image_s" in row:
            lines.append(f"| kernel conv {row['pass']} B={row['batch']}, one image at a time | {row['per_image_s'] * 1e3:.1f} ms | "
                         f"batched matmuls {row['batched_s'] * 1e3:.1f} ms | {row['batched_over_per_image']:.2f}x |")
    net = r["network"]
    for row in net["rows"]:
        lines.append(f"| apply B={row['batch']} ({net['preset']}) | {row['apply_images_per_s']:.2f} img/s | {row['apply_flops_per_s'] / 1e9:.1f} GFLOP/s of "
                     f"{max(net['peak'].values()) / 1e9:.1f} peak | {100 * row['fraction_of_peak']:.0f}% |")
        lines.append(f"| predict B={row['batch']} ({net['preset']}) | {row['predict_images_per_s']:.2f} img/s | apply {row['apply_images_per_s']:.2f} img/s | "
                     f"{row['predict_images_per_s'] / row['apply_images_per_s']:.2f} |")
    argmax, full = r["postprocess"]["rows"][0], r["postprocess"]["rows"][-1]
    lines.append(f"| post-processing, batch {r['postprocess']['batch']} | {full['jnp_batch_ms_per_face']:.2f} ms/face | {argmax['stages']} "
                 f"{argmax['jnp_batch_ms_per_face']:.2f} ms/face | {full['jnp_batch_ms_per_face'] / argmax['jnp_batch_ms_per_face']:.1f}x |")
    lines.append(f"| post-processing, one face | {full['jnp_batch1_ms']:.2f} ms | {argmax['stages']} {argmax['jnp_batch1_ms']:.2f} ms | "
                 f"{full['jnp_batch1_ms'] / argmax['jnp_batch1_ms']:.1f}x |")
    t = r["train"]
    lines.append(f"| train step ({t['preset']}, batch {t['batch']}) | {t['train_images_per_s']:.1f} img/s | pipeline {t['pipeline_images_per_s']:.0f} img/s | "
                 f"{t['pipeline_over_step']:.0f}x headroom |")
    for k, v in r["memory"].items():
        lines.append(f"| peak RSS {k} ({v['preset']}, batch {v['batch']}) | {v['peak_rss_mib']:.0f} MiB | | |")
    lines.append(f"\nFLOPs per image ({net['preset']}): {net['flops_per_image']['total'] / 1e9:.2f} G")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
