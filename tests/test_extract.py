"""lgcn-extract: a row for every input, detect()'s landmarks, resume after SIGKILL, one worker or two, aligned crops."""

import glob
import os
import shutil
import signal
import subprocess
import sys
import time

import cv2
import matplotlib
import numpy as np
import pytest
from PIL import Image, ImageDraw

import lgcn_jax
from data_prep.synthetic_faces import make_face
from lgcn_jax import crop as crop_lib
from lgcn_jax.extraction import extract, list_inputs, read_landmarks
from tests.conftest import ROOT, write_bomb_png

ray = pytest.importorskip("ray")
pytest.importorskip("pyarrow")
pytest.importorskip("pandas")
# Ray starts its processes with fork + exec (subprocess) from this process, where JAX's threads run; the warning is
# about a fork that goes on running Python, which these do not.
pytestmark = pytest.mark.filterwarnings(r"ignore:os\.fork\(\) was called:RuntimeWarning")

PHOTO = os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "sample_data", "grace_hopper.jpg")
FACES, EMPTY, SHARD = 40, 50, 8


@pytest.fixture(scope="module")
def ray_here():
    """One Ray instance for the module, on the 2 cores: extract() uses it rather than starting its own."""
    import logging

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def photos(tmp_path_factory, request):
    """~100 inputs: faces (300-W crops where --real-300w exists, with its weights; else synthetic faces), face-free
    images, and four bad files.  Returns (folder, weights)."""
    folder = tmp_path_factory.mktemp("photos")
    real = request.config.getoption("--real-300w")
    (folder / "faces").mkdir()
    if os.path.isdir(real):
        weights = "300w_cpu"
        for path in sorted(glob.glob(os.path.join(real, "helen", "testset", "*.jpg")))[:FACES]:
            shutil.copy(path, folder / "faces")
    else:
        weights = "synthetic_quick"
        for seed in range(FACES):
            Image.fromarray(make_face(seed, 160)[0]).save(folder / "faces" / f"synthetic_{seed:02d}.png")
    rng = np.random.default_rng(0)
    (folder / "empty").mkdir()
    for k in range(EMPTY):
        h, w = rng.integers(48, 260, 2)
        kind = k % 3
        img = (rng.integers(0, 255, (h, w)) if kind == 0 else np.full((h, w), 40 + 4 * k) if kind == 1
               else np.add.outer(np.arange(h), np.arange(w)) % 256).astype(np.uint8)
        Image.fromarray(img).save(folder / "empty" / f"empty_{k:02d}.{'png' if k % 2 else 'jpg'}")
    jpeg = open(PHOTO, "rb").read()
    (folder / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    (folder / "text.jpg").write_text("not an image\n")
    Image.fromarray(np.full((1, 1), 128, np.uint8)).save(folder / "tiny.png")
    write_bomb_png(folder / "bomb.png", 60000, 60000)
    (folder / "notes.txt.bak").write_text("not an input: a folder gives its images and videos only\n")
    return str(folder), weights


@pytest.fixture(scope="module")
def straight(ray_here, photos, tmp_path_factory):
    """The job run once, without interruption, on two workers: (out, summary)."""
    folder, weights = photos
    out = str(tmp_path_factory.mktemp("straight") / "out")
    return out, extract(folder, out, params=weights, shard_size=SHARD, workers=2)


def _key(df):
    return df.sort_values(["path", "frame", "face"], na_position="last").reset_index(drop=True)


def assert_same_rows(a, b, atol=1e-3):
    a, b = _key(a), _key(b)
    exact = ["path", "frame", "width", "height", "faces", "face", "model", "status", "error"]
    assert a[exact].astype(str).equals(b[exact].astype(str))
    for name in ("box", "score", "confidence", "angle"):
        for x, y in zip(a[name], b[name]):
            np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), atol=atol, err_msg=name)
    for x, y in zip(a["landmarks"], b["landmarks"]):
        assert (x is None) == (y is None)
        if x is not None:
            np.testing.assert_allclose(x, y, atol=atol)


def test_every_input_has_a_row_the_bad_ones_say_why_and_the_landmarks_are_detects(straight, photos):
    folder, weights = photos
    out, summary = straight
    df = read_landmarks(out)
    inputs = list_inputs(folder)
    assert len(inputs) == FACES + EMPTY + 4 and not [p for p in inputs if p.endswith(".bak")]
    assert sorted(set(df["path"])) == inputs
    assert summary["inputs"] == len(inputs) and summary["skipped"] == 0 and summary["shards"] == -(-len(inputs) // SHARD)
    by_path = {p: g for p, g in df.groupby("path")}
    reasons = {name: by_path[os.path.join(folder, name)] for name in ("truncated.jpg", "text.jpg", "bomb.png", "tiny.png")}
    for name in ("truncated.jpg", "text.jpg", "bomb.png"):
        (row,) = reasons[name].itertuples()
        assert row.status == "error" and row.faces == 0 and name in row.error and row.landmarks is None, row
    assert "truncated" in reasons["truncated.jpg"].error.iloc[0]
    assert "cannot identify image file" in reasons["text.jpg"].error.iloc[0]
    assert "3,600,000,000 pixels" in reasons["bomb.png"].error.iloc[0] and "178,956,970" in reasons["bomb.png"].error.iloc[0]
    (tiny,) = reasons["tiny.png"].itertuples()
    assert (tiny.status, tiny.width, tiny.height, tiny.faces) == ("no_face", 1, 1, 0)
    assert (df["model"] == weights).all() and df["frame"].isna().all()
    model = lgcn_jax.load_pretrained(weights)
    found = 0
    for path in inputs:
        rows = by_path[path]
        if rows["status"].iloc[0] == "error":
            continue
        faces = lgcn_jax.detect(path, model, detector="yunet", refine=1)  # extract()'s defaults, not this machine's
        assert rows["faces"].iloc[0] == len(faces), path
        if not faces:
            assert len(rows) == 1 and rows["status"].iloc[0] == "no_face"
            continue
        assert list(rows["face"]) == list(range(len(faces))) and (rows["status"] == "ok").all()
        assert (rows["width"].iloc[0], rows["height"].iloc[0]) == Image.open(path).size
        for face, row in zip(faces, rows.itertuples()):
            np.testing.assert_allclose(row.landmarks, face.landmarks, atol=1e-3, err_msg=path)
            np.testing.assert_allclose(row.box, face.box, atol=1e-3)
            np.testing.assert_allclose(row.confidence, face.confidence, atol=1e-3)
            assert row.score == pytest.approx(face.score, abs=1e-5)
            found += 1
    # YuNet finds 33 of the 40 synthetic faces and every 300-W one: enough faces that the comparison means something.
    assert found >= 0.8 * FACES and summary["faces"] == found


def test_one_worker_gives_the_rows_of_two(straight, photos, tmp_path):
    folder, weights = photos
    summary = extract(folder, str(tmp_path / "one"), params=weights, shard_size=SHARD, workers=1)
    assert summary["faces"] == straight[1]["faces"]
    assert_same_rows(read_landmarks(str(tmp_path / "one")), read_landmarks(straight[0]))


def test_a_job_killed_midway_resumes_to_the_table_of_a_straight_run(straight, photos, tmp_path):
    """lgcn-extract in its own process (and its own Ray) is SIGKILLed once its first shard is on disk; the same
    command again finishes the other shards only, and the union is the straight run's table."""
    folder, weights = photos
    out = tmp_path / "out"
    args = [folder, "--out", str(out), "--checkpoint", weights, "--shard_size", str(SHARD), "--no_progress"]
    job = subprocess.Popen([sys.executable, "-m", "lgcn_jax.cli.extract", *args], cwd=ROOT, start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while not glob.glob(str(out / "landmarks" / "part-*.parquet")):
            assert job.poll() is None, job.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no shard written in 240 s"
            time.sleep(0.05)
        job.kill()  # SIGKILL: no clean-up of any kind
        job.wait()
    finally:
        # Ray's helper processes that the job started share its session; its actors exit with their raylet.
        try:
            os.killpg(job.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    before = {f: os.path.getmtime(f) for f in glob.glob(str(out / "landmarks" / "part-*.parquet"))}
    total = -(-(FACES + EMPTY + 4) // SHARD)
    assert 0 < len(before) < total, len(before)
    from lgcn_jax.cli.extract import main

    assert main(args) == 0  # the same command, in this process's Ray
    after = sorted(glob.glob(str(out / "landmarks" / "part-*.parquet")))
    assert len(after) == total and not [f for f in os.listdir(out / "landmarks") if not f.startswith("part-")]
    assert {f: os.path.getmtime(f) for f in before} == before  # the shards written before the kill stand as they were
    assert_same_rows(read_landmarks(str(out)), read_landmarks(straight[0]))


def test_the_out_folder_is_the_jobs_own(ray_here, photos, tmp_path):
    folder, weights = photos
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds files and no job.json"):
        extract(folder, str(mine), params=weights)
    assert os.listdir(mine) == ["notes.txt"]
    with pytest.raises(ValueError, match="no image or video in this folder or below"):
        extract(str(mine), str(tmp_path / "none"), params=weights)
    small = tmp_path / "small"
    small.mkdir()
    for name in ("empty_00.jpg", "empty_01.png"):
        shutil.copy(os.path.join(folder, "empty", name), small)
    out = str(tmp_path / "out")
    assert extract(str(small), out, params=weights)["inputs"] == 2
    table = os.path.join(out, "landmarks", "part-00000.parquet")
    stamp = os.path.getmtime(table)
    with pytest.raises(ValueError, match=r"refine: 1 there, 0 now.*--overwrite"):
        extract(str(small), out, params=weights, refine=0)
    shutil.copy(os.path.join(folder, "empty", "empty_02.jpg"), small)
    with pytest.raises(ValueError, match=r"inputs: 2 there, 3 now \(1 new, 0 gone\)"):
        extract(str(small), out, params=weights)
    assert os.path.getmtime(table) == stamp
    assert extract(str(small), out, params=weights, overwrite=True)["inputs"] == 3
    assert len(read_landmarks(out)) == 3


def test_aligned_crops_put_the_eyes_where_the_ffhq_alignment_does_and_videos_give_every_nth_frame(ray_here, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    photo = Image.open(PHOTO).convert("RGB")
    photo.save(src / "hopper.png")
    small = photo.resize((photo.width // 2, photo.height // 2), Image.BILINEAR)
    writer = cv2.VideoWriter(str(src / "clip.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 25, small.size)
    for i in range(5):
        writer.write(cv2.cvtColor(np.roll(np.asarray(small), 4 * i, axis=1), cv2.COLOR_RGB2BGR))
    writer.release()
    out = tmp_path / "out"
    summary = extract(str(src), str(out), params="300w_cpu", align="ffhq", size=256, every=2)
    assert (summary["videos"], summary["frames"], summary["errors"]) == (1, 3, 0)
    df = read_landmarks(str(out))
    video = df[df["path"].str.endswith("clip.avi")]
    assert list(video["frame"]) == [0, 2, 4] and (video["status"] == "ok").all()
    assert list(video["aligned"]) == [f"aligned/clip/{f:06d}_0.png" for f in (0, 2, 4)]
    (row,) = df[df["path"].str.endswith("hopper.png")].itertuples()
    assert row.aligned == "aligned/hopper_0.png"
    transform = np.asarray(row.align_transform).reshape(2, 3)
    crop = np.asarray(Image.open(out / row.aligned))
    assert crop.shape == (256, 256, 3)
    np.testing.assert_array_equal(crop, crop_lib.warp(np.asarray(photo), transform, 256))  # the file is the row's transform
    # FFHQ's own recipe (ffhq-dataset, recreate_aligned_images): its quad, and PIL's QUAD transform onto it.
    lm = row.landmarks.astype(np.float64)
    eye_left, eye_right = lm[36:42].mean(0), lm[42:48].mean(0)
    eye_avg, eye_to_eye = (eye_left + eye_right) * 0.5, eye_right - eye_left
    eye_to_mouth = (lm[48] + lm[54]) * 0.5 - eye_avg
    x = eye_to_eye - np.flipud(eye_to_mouth) * [-1, 1]
    x /= np.hypot(*x)
    x *= max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8)
    y = np.flipud(x) * [-1, 1]
    c = eye_avg + eye_to_mouth * 0.1
    quad = np.stack([c - x - y, c - x + y, c + x + y, c + x - y])
    corners = np.array([[-0.5, -0.5], [-0.5, 255.5], [255.5, 255.5], [255.5, -0.5]])  # the crop's outer edges
    np.testing.assert_allclose(crop_lib.apply_affine(transform, corners), quad, atol=1e-3)
    # Green dots on the eye centres: found in both crops where the transform says they are.
    dotted = Image.fromarray(np.asarray(photo).copy())
    draw = ImageDraw.Draw(dotted)
    for eye in (eye_left, eye_right):
        draw.ellipse([eye[0] - 3, eye[1] - 3, eye[0] + 3, eye[1] + 3], fill=(0, 255, 0))
    ffhq = np.asarray(dotted.transform((256, 256), Image.Transform.QUAD, tuple((quad + 0.5).flatten()), Image.Resampling.BILINEAR))
    ours = crop_lib.warp(np.asarray(dotted), transform, 256)
    expected = crop_lib.apply_affine(crop_lib.invert_affine(transform), np.stack([eye_left, eye_right]))
    for image in (ffhq, ours):
        g = image.astype(np.float64)
        green = (g[..., 1] - (g[..., 0] + g[..., 2]) / 2) > 100
        labels = (np.indices(green.shape)[1] > 128).astype(int)  # the left eye's dot on the crop's left half
        for k, eye in enumerate(expected):
            ys, xs = np.nonzero(green & (labels == k))
            assert len(xs) > 10
            np.testing.assert_allclose([xs.mean(), ys.mean()], eye, atol=1.0)


def test_import_lgcn_jax_does_not_import_ray_and_a_missing_extra_is_one_line(tmp_path):
    code = ("import sys, lgcn_jax; lgcn_jax.detect; assert 'ray' not in sys.modules and 'pyarrow' not in sys.modules\n"
            "sys.modules['ray'] = None\n"
            "from lgcn_jax.cli.extract import main\n"
            f"sys.exit(main([{PHOTO!r}, '--out', {str(tmp_path / 'out')!r}]))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr[-3000:]
    assert r.stderr.strip().splitlines() == ["lgcn-extract: error: lgcn_jax.extract needs ray: pip install 'lgcn_jax[extract]'"]
