"""The 300-W builder on a generated tree in the official layout; image modes; bad input; crops."""

import os

import numpy as np
import pytest
from PIL import Image

from data_prep import build_300w
from data_prep.synthetic_faces import make_face
from lgcn_jax import crop as crop_lib
from lgcn_jax.image_io import ImageError, load_gray, to_gray

LAYOUT = {  # folder -> number of faces in the fixture
    "afw": 2, "helen/trainset": 2, "lfpw/trainset": 1, "helen/testset": 2, "lfpw/testset": 1, "ibug": 2,
    "300W/01_Indoor": 1, "300W/02_Outdoor": 1,
}
SIZES = {"train": 5, "common": 3, "challenging": 2, "full": 5, "test": 2}


def write_pts(path, points, n=None):
    n = len(points) if n is None else n
    rows = "\n".join(f"{x + 1:.3f} {y + 1:.3f}" for x, y in points)  # .pts counts from 1
    with open(path, "w") as f:
        f.write(f"version: 1\nn_points:  {n}\n{{\n{rows}\n}}\n")


def make_photo(seed, canvas=(180, 140)):
    """A synthetic face pasted into a larger photo: (u8[H, W], landmarks f32[68, 2] in photo pixels)."""
    face, lm = make_face(seed, 96)
    photo = np.full(canvas[::-1], 90, np.uint8)
    ox, oy = 20 + seed % 30, 10 + seed % 20
    photo[oy:oy + 96, ox:ox + 96] = face
    return photo, lm + np.array([ox, oy], np.float32)


def make_tree(root, layout=LAYOUT):
    truth = {}
    seed = 0
    for folder, n in layout.items():
        d = os.path.join(root, folder)
        os.makedirs(d, exist_ok=True)
        for i in range(n):
            photo, lm = make_photo(seed)
            name = f"img_{seed:03d}_1"
            ext = ".png" if folder.startswith("300W") else ".jpg"
            Image.fromarray(photo).convert("RGB").save(os.path.join(d, name + ext), quality=95)
            write_pts(os.path.join(d, name + ".pts"), lm)
            truth[f"{folder}/{name}{ext}"] = (photo, lm)
            seed += 1
    return truth


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("300w_raw"))
    truth = make_tree(root)
    data_dir = str(tmp_path_factory.mktemp("tfds300w"))
    assert build_300w.main(["--manual_dir", root, "--data_dir", data_dir, "--workers", "2"]) == 0
    return root, data_dir, truth


def _load(data_dir, split):
    import tensorflow_datasets as tfds

    b = build_300w.Face300W(data_dir=data_dir)
    return tfds.as_numpy(b.as_dataset(split=split, batch_size=-1, shuffle_files=False)), b


def test_split_sizes_and_membership(built):
    root, data_dir, truth = built
    for split, n in SIZES.items():
        d, b = _load(data_dir, split)
        assert b.info.splits[split].num_examples == n and d["image"].shape == (n, 96, 96, 1)
        folders = {os.path.dirname(f.decode()) for f in d["file_name"]}
        assert folders == {f for f in build_300w.SUBSETS[split] if f in LAYOUT}, split


def test_examples_map_back_to_the_original_image(built):
    root, data_dir, truth = built
    d, _ = _load(data_dir, "full")
    for image, lm, box, name, size in zip(d["image"], d["landmarks"], d["box"], d["file_name"], d["original_size"]):
        photo, want = truth[name.decode()]
        assert tuple(size) == photo.shape
        np.testing.assert_allclose(crop_lib.to_original(lm, box, 96), want, atol=2e-3)
        # The box is the documented one: square, centred on the landmarks' bounding box, 20% margin.
        lo, hi = want.min(0), want.max(0)
        np.testing.assert_allclose((box[:2] + box[2:]) / 2, (lo + hi) / 2, atol=1e-3)
        assert box[2] - box[0] == pytest.approx(1.4 * (hi - lo).max(), abs=5e-3)  # .pts keep 3 decimals
        # The stored crop is the photo's content at those coordinates.
        np.testing.assert_allclose(image[..., 0].astype(float), crop_lib.crop(photo, box, 96).astype(float), atol=6)


def test_crop_coordinates_follow_the_content():
    img = np.zeros((120, 160), np.uint8)
    img[41, 77] = 255  # one bright pixel at (x, y) = (77, 41)
    box = crop_lib.square_box(np.array([70.3, 50.8]), 48.0)
    c = crop_lib.crop(img, box, 96).astype(float)  # 2x upsampling: the dot spreads over a few pixels
    ys, xs = np.mgrid[0:96, 0:96]
    centroid = np.array([(c * xs).sum(), (c * ys).sum()]) / c.sum()
    np.testing.assert_allclose(centroid, crop_lib.to_crop(np.array([[77.0, 41.0]]), box, 96)[0], atol=0.05)
    big = np.zeros((900, 900), np.uint8)
    big[400:500, 300:400] = 255  # a square; downscaled 8x through the reduce branch
    c = crop_lib.crop(big, crop_lib.square_box(np.array([450.0, 450.0]), 768.0), 96).astype(float)
    ys, xs = np.mgrid[0:96, 0:96]
    centroid = np.array([(c * xs).sum(), (c * ys).sum()]) / c.sum()
    np.testing.assert_allclose(centroid, crop_lib.to_crop(np.array([[349.5, 449.5]]), crop_lib.square_box(np.array([450.0, 450.0]), 768.0), 96)[0], atol=0.1)


def test_image_modes(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    gray = to_gray(rgb)
    np.testing.assert_allclose(gray.astype(int), np.asarray(Image.fromarray(rgb).convert("L")).astype(int), atol=1)
    cases = {
        "L.png": Image.fromarray(gray),
        "RGBA.png": Image.fromarray(np.dstack([rgb, np.full((20, 30), 255, np.uint8)]), "RGBA"),
        "I16.png": Image.fromarray(gray.astype(np.uint16) * 257),
        "CMYK.jpg": Image.fromarray(rgb).convert("CMYK"),
        "P.png": Image.fromarray(rgb).convert("P"),
    }
    for name, im in cases.items():
        path = str(tmp_path / name)
        im.save(path, quality=100) if name.endswith(".jpg") else im.save(path)
        g = load_gray(path)
        assert g.dtype == np.uint8 and g.shape == (20, 30), name
        tol = {"P.png": 40, "CMYK.jpg": 20}.get(name, 1)
        assert np.abs(g.astype(int) - gray.astype(int)).mean() < tol, name
    half = np.dstack([rgb, np.full((20, 30), 0, np.uint8)])  # fully transparent: black
    assert to_gray(half).max() == 0
    assert to_gray(gray.astype(np.float32) / 255.0).tolist() == gray.tolist()
    # The same pixels in other integer types and byte orders, and a float resize overshoot above 1.
    for same in (gray.astype(np.int32), Image.fromarray(gray.astype(np.int32)), (gray.astype(np.uint16) * 257).astype(">u2"),
                 Image.fromarray(gray.astype(np.int32) * 257), gray.astype(">f4") / 255.0):
        assert load_gray(same).tolist() == gray.tolist(), type(same)
    over = gray.astype(np.float32) / 255.0 * 1.02
    np.testing.assert_array_equal(load_gray(over), np.clip(np.round(over * 255), 0, 255).astype(np.uint8))
    with pytest.raises(ImageError, match="an integer image must hold 0..255 or 0..65535, got values from -"):
        to_gray(gray.astype(np.int32) - 256)


def test_exif_orientation(tmp_path):
    img = np.zeros((20, 30), np.uint8)
    img[2, 25] = 255
    im = Image.fromarray(img)
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    path = str(tmp_path / "rot.jpg")
    im.save(path, exif=exif, quality=100)
    with pytest.raises(ImageError, match="rot.jpg has EXIF orientation 6"):
        load_gray(path, exif="error")
    assert load_gray(path, exif="stored").shape == (20, 30)
    viewed = load_gray(path, exif="apply")
    assert viewed.shape == (30, 20)
    assert np.unravel_index(viewed.argmax(), viewed.shape) == (25, 17)


BAD = {
    "wrong_count": lambda d: write_pts(os.path.join(d, "img_000_1.pts"), make_photo(0)[1][:60]),
    "non_finite": lambda d: open(os.path.join(d, "img_000_1.pts"), "w").write(
        "version: 1\nn_points: 68\n{\n" + "1 2\n" * 40 + "nan 3\n" + "1 2\n" * 27 + "}\n"),
    "not_pts": lambda d: open(os.path.join(d, "img_000_1.pts"), "w").write("hello\n"),
    "missing_image": lambda d: os.remove(os.path.join(d, "img_000_1.jpg")),
    "unreadable_image": lambda d: open(os.path.join(d, "img_000_1.jpg"), "wb").write(b"\xff\xd8 not really a jpeg"),
}
MESSAGES = {"wrong_count": "has 60 points", "non_finite": "point 41 is not finite", "not_pts": "not an iBUG .pts file",
            "missing_image": "no image beside it", "unreadable_image": "cannot read the image"}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_files_name_the_file(tmp_path, capsys, case):
    root = str(tmp_path / "raw")
    make_tree(root, {"afw": 1, "helen/trainset": 1, "lfpw/trainset": 1, "helen/testset": 1, "lfpw/testset": 1, "ibug": 1})
    BAD[case](os.path.join(root, "afw"))
    code = build_300w.main(["--manual_dir", root, "--data_dir", str(tmp_path / "tfds"), "--workers", "1"])
    err = capsys.readouterr().err
    assert code == 1 and os.path.join("afw", "img_000_1") in err and MESSAGES[case] in err, err
    assert not build_300w.Face300W(data_dir=str(tmp_path / "tfds")).is_prepared()  # nothing half-built left behind
    code = build_300w.main(["--manual_dir", root, "--data_dir", str(tmp_path / "tfds2"), "--workers", "1", "--skip_bad"])
    out = capsys.readouterr().out
    assert code == 0 and "train            2 faces  (1 skipped)" in out, out


def test_missing_subset_folder_is_reported_once_and_its_splits_skipped(tmp_path, capsys, caplog):
    import run_eval
    from tests.conftest import tiny_config

    root = str(tmp_path / "raw")
    make_tree(root, {"afw": 4, "helen/trainset": 1, "lfpw/trainset": 1, "helen/testset": 1, "lfpw/testset": 1})
    data_dir = str(tmp_path / "tfds")
    with caplog.at_level("WARNING", logger="data_prep.build_300w"):
        assert build_300w.main(["--manual_dir", root, "--data_dir", data_dir]) == 0
    out = capsys.readouterr().out
    assert "train" in out and "common" in out and "challenging" not in out
    absent = [r.getMessage() for r in caplog.records if "is absent" in r.getMessage()]
    assert len([m for m in absent if "/ibug is absent (0 of 135 faces)" in m]) == 1, absent
    assert any("afw holds 4 of 337 faces" in r.getMessage() for r in caplog.records)
    # run_eval: the absent split named on the command line is an error saying how to add it; the default skips it.
    import lgcn_jax

    cfg = lgcn_jax.apply_overrides(tiny_config(num_steps=1, eval_every=1, checkpoint_every=1),
                                   ["data.dataset=300w", f"data.data_dir={data_dir}", "data.validation_faces=1"])
    lgcn_jax.train_and_evaluate(cfg, str(tmp_path / "w"), progress=False)
    capsys.readouterr()
    assert run_eval.main(["--workdir", str(tmp_path / "w"), "--split", "challenging", "--no_progress"]) == 1
    err = capsys.readouterr().err
    assert "'challenging' is not in the build" in err and "ibug" in err and "build_300w --manual_dir" in err
    assert run_eval.main(["--workdir", str(tmp_path / "w"), "--no_progress"]) == 0
    cap = capsys.readouterr()
    assert "split 'challenging' is not in this build; skipping it" in cap.err and "common" in cap.out
    assert sorted(os.listdir(tmp_path / "w" / "eval")) == ["ced_common.png", "eval_common.json"]


def test_train_and_eval_on_300w(built, tmp_path, capsys):
    """The same pipeline trains on 300-W (resized to the tiny net's 32 px) and run_eval reads its splits."""
    import lgcn_jax
    import run_eval
    from tests.conftest import tiny_config

    root, data_dir, truth = built
    cfg = lgcn_jax.apply_overrides(tiny_config(num_steps=2, eval_every=2, checkpoint_every=2),
                                   ["data.dataset=300w", f"data.data_dir={data_dir}", "data.validation_faces=1"])
    result = lgcn_jax.train_and_evaluate(cfg, str(tmp_path / "w"), progress=False)
    # One photo of each training subset is held out for validation (the common subset never is).
    assert result["num_faces"] == 3 and np.isfinite(result["nme"])
    assert run_eval.main(["--workdir", str(tmp_path / "w"), "--no_progress"]) == 0
    out = capsys.readouterr().out
    import json

    for split in ("common", "challenging", "full"):
        assert f"{split}" in out and (tmp_path / "w" / "eval" / f"eval_{split}.json").exists()
    rep = json.loads((tmp_path / "w" / "eval" / "eval_challenging.json").read_text())
    assert sorted(rep["file_names"]) == sorted(k for k in truth if k.startswith("ibug/"))
    assert run_eval.main(["--workdir", str(tmp_path / "w"), "--split", "validation", "--no_progress"]) == 1
    assert "300-W has no split 'validation'" in capsys.readouterr().err
    rep = json.loads((tmp_path / "w" / "eval" / "eval_common.json").read_text())
    assert sorted(rep["subsets"]) == ["helen", "lfpw"] and rep["subsets"]["helen"]["num_faces"] == 2
