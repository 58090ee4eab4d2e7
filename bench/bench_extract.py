"""Images per second of lgcn-extract (the Ray Data job) against the plain detect_batch loop, on the same images in one run.

    python bench/bench_extract.py [--images 300] [--dir DIR] [--checkpoint 300w_cpu ...] [--repeats 2]

The images: the first of the 300-W common subset (HELEN and LFPW test photos, ../shared/data/300w_partial or $LGCN_300W_DIR)
where it is here, else synthetic scenes (data_prep's faces pasted on textured backgrounds).  Each is timed as a user runs
it, as a whole process from start to exit (Python start-up, imports, model loading and compilation included):

  loop:  a process that calls ``detect_batch`` on chunks of ``--batch_size`` paths, in the job's detector and passes
         (``extract()``'s defaults), and keeps the faces;
  job:   ``lgcn-extract LIST --out DIR`` (Ray started embedded on this machine, its default actors, the Parquet table);

and the loop's steady rate after its first chunk (compilation excluded) is recorded too.  The weights: 300w_cpu and
this machine's default (``release.default_weights``), once each where they are the same.  Every variant runs
``--repeats`` times, alternating, and the fastest counts (other work on a shared machine only slows a run); the
1-minute load average before and after each pair is recorded with them.
Writes bench/results_extract.json.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

from common import machine, write_results

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from lgcn_jax.release import default_weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL_300W = os.environ.get("LGCN_300W_DIR", os.path.join(os.path.dirname(ROOT), "shared", "data", "300w_partial"))

# The plain loop, as a script of its own: prints its steady rate (images/s after the first chunk) as JSON.
LOOP = """
import inspect, json, sys, time
import lgcn_jax
from lgcn_jax import extraction
paths, weights, batch = open(sys.argv[1]).read().split(), sys.argv[2], int(sys.argv[3])
model = lgcn_jax.load_pretrained(weights)
# The job's own detector and passes (extract()'s defaults), not detect()'s defaults for this machine.
job = inspect.signature(extraction.extract).parameters
settings = {k: job[k].default for k in ("detector", "refine")}
faces, t = 0, None
for lo in range(0, len(paths), batch):
    faces += sum(len(f) for f in lgcn_jax.detect_batch(paths[lo:lo + batch], model, batch_size=batch, **settings))
    if t is None:
        t, first = time.perf_counter(), lo + batch
print(json.dumps({"faces": faces, "steady_images_per_s": (len(paths) - first) / (time.perf_counter() - t) if len(paths) > first else None}))
"""


def images(n: int, folder: str) -> tuple[list[str], str]:
    """``n`` image paths and where they come from: 300-W common photos, or synthetic scenes written to ``folder``."""
    real = sorted(p for sub in ("helen/testset", "lfpw/testset") for p in glob.glob(os.path.join(REAL_300W, sub, "*.jpg")))
    if len(real) >= n:
        return real[:n], f"300-W common subset photos ({REAL_300W})"
    from data_prep.synthetic_faces import make_face

    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        canvas = Image.fromarray(rng.integers(40, 200, (320, 320)).astype(np.uint8)).convert("RGB")
        canvas.paste(Image.fromarray(make_face(i, 200)[0]).convert("RGB"), tuple(int(v) for v in rng.integers(0, 120, 2)))
        paths.append(os.path.join(folder, f"scene_{i:04d}.jpg"))
        canvas.save(paths[-1], quality=92)
    return paths, "synthetic scenes of data_prep.synthetic_faces (no 300-W here)"


def timed(cmd: list[str]) -> tuple[float, str]:
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - t
    if r.returncode != 0:
        raise RuntimeError(f"{cmd[:3]} failed:\n{r.stderr[-3000:]}")
    return seconds, r.stdout


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--checkpoint", nargs="*", help="weights to time (default: 300w_cpu and this machine's default)")
    p.add_argument("--batch_size", type=int, default=16, help="the loop's chunk and the job's batch")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--job_args", default="", help="more lgcn-extract flags, e.g. '--workers 1 --cpus_per_worker 2'")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results_extract.json"))
    args = p.parse_args(argv)
    weights = list(dict.fromkeys(args.checkpoint or ["300w_cpu", default_weights()]))
    bin_dir = os.path.dirname(sys.executable)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        paths, source = images(args.images, tmp)
        listing = os.path.join(tmp, "inputs.txt")
        with open(listing, "w") as f:
            f.write("\n".join(paths) + "\n")
        for w in weights:
            loop_s, job_s, steady, load = [], [], [], [os.getloadavg()[0]]
            for k in range(args.repeats):
                seconds, out = timed([sys.executable, "-c", LOOP, listing, w, str(args.batch_size)])
                loop = json.loads(out.strip().splitlines()[-1])
                loop_s.append(seconds)
                steady.append(loop["steady_images_per_s"])
                out_dir = os.path.join(tmp, f"job_{w}_{k}")
                seconds, _ = timed([os.path.join(bin_dir, "lgcn-extract"), listing, "--out", out_dir, "--checkpoint", w, "--no_progress",
                                    "--batch_size", str(args.batch_size), *args.job_args.split()])
                job_s.append(seconds)
                load.append(os.getloadavg()[0])
                table = pq.read_table(os.path.join(out_dir, "landmarks"))
                job_faces = sum(s == "ok" for s in table.column("status").to_pylist())
                print(f"{w} #{k + 1}: loop {loop_s[-1]:.1f} s ({loop['faces']} faces), job {job_s[-1]:.1f} s ({job_faces} faces)",
                      flush=True)
            row = {"weights": w, "images": len(paths), "faces": {"loop": loop["faces"], "job": job_faces},
                   "loop_s": loop_s, "job_s": job_s,
                   "loop_images_per_s": len(paths) / min(loop_s), "job_images_per_s": len(paths) / min(job_s),
                   "loop_steady_images_per_s": max(steady), "load_average_1min": load}
            row["job_over_loop"] = row["job_images_per_s"] / row["loop_images_per_s"]
            results.append(row)
            print(f"{w}: job {row['job_images_per_s']:.2f} images/s, loop {row['loop_images_per_s']:.2f} images/s "
                  f"(x{row['job_over_loop']:.2f}; the loop after compiling: {row['loop_steady_images_per_s']:.2f} images/s)", flush=True)
    return write_results({"machine": machine(), "images": source, "batch_size": args.batch_size, "job_args": args.job_args,
                          "results": results}, args.out)


if __name__ == "__main__":
    main()
