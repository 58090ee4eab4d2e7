"""Training step throughput against the input pipeline: is training input-bound?

    python bench/bench_train.py [--preset quick] [--dataset synthetic --data_dir DIR] [--steps 10]

Times ``train_step`` on device-resident batches (images/s consumed; the augmentation runs inside
the timed step) and, separately, the input stream (examples/s produced), in the same run: tf.data
where TensorFlow is installed, else NumPy batches (``data.pipeline``; synthetic faces are then
generated in memory unless ``--data_dir`` is an array export).  Writes bench/results_train.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from common import machine, write_results

import jax

import lgcn_jax
from lgcn_jax import datasets, input_pipeline


def _stream(data, cfg, batch: int, pipeline: str):
    """The raw training stream; the step augments on the device either way."""
    stream = input_pipeline.tf_batches if pipeline == "tf" else input_pipeline.array_batches
    return stream(data, batch, seed=0), cfg.data


def pipeline_rate(data, cfg, batch: int, batches: int, pipeline: str) -> float:
    it, _ = _stream(data, cfg, batch, pipeline)
    for _ in range(3):  # warm-up: tf.data spins up its threads
        next(it)
    t = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch / (time.perf_counter() - t)


def step_rate(data, cfg, steps: int, pipeline: str) -> tuple[float, float]:
    t = cfg.train
    state = lgcn_jax.create_train_state(cfg)
    it, augment = _stream(data, cfg, t.batch_size, pipeline)
    batches = [jax.device_put(next(it)) for _ in range(min(steps, 4))]
    t0 = time.perf_counter()
    state, m = lgcn_jax.train_step(state, batches[0], t.loss_scale, augment)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    times = []
    for k in range(steps):
        t0 = time.perf_counter()
        state, m = lgcn_jax.train_step(state, batches[k % len(batches)], t.loss_scale, augment)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    return t.batch_size / statistics.median(times), compile_s


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--preset", default="quick")
    p.add_argument("--config", nargs="*", default=[])
    p.add_argument("--dataset", default="synthetic")
    p.add_argument("--data_dir")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--pipeline_batches", type=int, default=100)
    p.add_argument("--faces", type=int, default=512, help="synthetic faces to generate where TensorFlow is absent to build the set")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results_train.json"))
    args = p.parse_args(argv)
    overrides = list(args.config) + [f"data.dataset={args.dataset}"] + ([f"data.data_dir={args.data_dir}"] if args.data_dir else [])
    cfg = lgcn_jax.apply_overrides(lgcn_jax.get_config(args.preset), overrides)
    pipeline = input_pipeline.resolve_pipeline(cfg.data)
    source = "train split"
    try:
        data = datasets.load_split(cfg.data, "train")
    except datasets.DatasetError:
        if cfg.data.dataset != "synthetic" or pipeline == "tf":
            raise
        # No TensorFlow to build or read the TFDS set (e.g. a GPU box): the same faces, generated here.
        from data_prep.synthetic_faces import make_split

        images, landmarks = make_split("train", args.faces, cfg.data.image_size)
        data, source = {"image": images[..., None], "landmarks": landmarks}, f"{args.faces} synthetic faces generated in memory"
    consume, compile_s = step_rate(data, cfg, args.steps, pipeline)
    produce = pipeline_rate(data, cfg, cfg.train.batch_size, args.pipeline_batches, pipeline)
    bound = "input-bound" if produce < consume else "compute-bound"
    print(f"{args.preset} ({cfg.data.image_size} px, batch {cfg.train.batch_size}, {pipeline} pipeline): train step consumes {consume:8.1f} img/s "
          f"(first step incl. compile {compile_s:.1f} s); pipeline produces {produce:8.1f} img/s -> {produce / consume:.1f}x headroom, {bound}", flush=True)
    result = {"machine": machine(), "preset": args.preset, "overrides": overrides, "pipeline": pipeline, "data": source, "image_size": cfg.data.image_size,
              "batch": cfg.train.batch_size, "train_images_per_s": consume, "first_step_s": compile_s,
              "pipeline_images_per_s": produce, "pipeline_over_step": produce / consume, "verdict": bound}
    return write_results(result, args.out)


if __name__ == "__main__":
    main()
