"""Peak resident memory of one workload, in a fresh process so other work does not count.

    python bench/bench_memory.py predict --preset paper --batch 32
    python bench/bench_memory.py train --preset quick

Prints one JSON line per workload: the RSS after imports and setup, and the peak RSS while the workload
(compilation included) ran, which on Linux is measured from a reset high-water mark.
"""

from __future__ import annotations

import argparse
import json

from common import current_rss_mib, peak_rss_mib, reset_peak_rss

import jax
import numpy as np

import lgcn_jax


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("what", choices=["predict", "train"])
    p.add_argument("--preset", default="paper")
    p.add_argument("--config", nargs="*", default=[])
    p.add_argument("--batch", type=int, default=32)
    args = p.parse_args(argv)
    cfg = lgcn_jax.apply_overrides(lgcn_jax.get_config(args.preset), args.config)
    size = cfg.data.image_size
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, (args.batch, size, size, 1)).astype(np.float32)
    if args.what == "predict":
        from data_prep.synthetic_faces import make_face

        params = lgcn_jax.init(jax.random.key(0), cfg, image_size=size)
        sm = lgcn_jax.build_shape_model(np.stack([make_face(s, size)[1] for s in range(32)]), size)
        base, reset = current_rss_mib(), reset_peak_rss()
        jax.block_until_ready(lgcn_jax.predict(params, images, sm))
    else:
        state = lgcn_jax.create_train_state(cfg)
        batch = {"image": images, "landmarks": rng.uniform(10, size - 10, (args.batch, 68, 2)).astype(np.float32)}
        base, reset = current_rss_mib(), reset_peak_rss()
        state, m = lgcn_jax.train_step(state, batch, cfg.train.loss_scale)
        jax.block_until_ready(m)
    result = {"what": args.what, "preset": args.preset, "overrides": args.config, "batch": args.batch,
              "baseline_rss_mib": base, "peak_rss_mib": peak_rss_mib(), "peak_is_of_workload": reset}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
