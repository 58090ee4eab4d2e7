"""Bad input a user may give: one clear error naming the file or key and the fix, nothing of theirs changed."""

import json
import os

import numpy as np
import pytest

import lgcn_jax
from data_prep.export_arrays import export_arrays
from lgcn_jax import datasets, workdir
from lgcn_jax.cli import eval as cli_eval
from lgcn_jax.cli import train as cli_train
from lgcn_jax.cli.detect import main as detect_main
from lgcn_jax.config import DataConfig, config_from_dict, config_to_dict, read_config
from lgcn_jax.metric_writer import MetricWriter
from tests.conftest import tiny_config

RELEASED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "checkpoints", "synthetic_quick")


def _stored(section, key, value):
    d = config_to_dict(lgcn_jax.get_config("quick"))
    d[section][key] = value
    return d


@pytest.mark.parametrize("section,key,value,message", [
    ("model", "num_filters", "abc", "model.num_filters is 'abc', not of type int"),
    ("model", "num_filters", True, "model.num_filters is True, not of type int"),
    ("train", "lr_decay_steps", [400, "x"], "train.lr_decay_steps"),
    ("data", "contrast_range", [0.7], "data.contrast_range"),
    ("data", "dataset", "300W", "data.dataset must be 'synthetic' or '300w'"),
    ("train", "log_every", 0, "train.log_every must be at least 1"),
])
def test_stored_config_values_are_checked_and_the_file_named(tmp_path, section, key, value, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.").replace("(", r"\(")):
        config_from_dict(_stored(section, key, value))
    (tmp_path / "config.json").write_text(json.dumps(_stored(section, key, value)))
    with pytest.raises(lgcn_jax.CheckpointError, match=f"{tmp_path}/config.json is corrupt or from an incompatible"):
        read_config(str(tmp_path))
    with pytest.raises(ValueError, match=r"unknown sections \['lr'\]"):
        config_from_dict({"lr": 0.1})
    # ints where floats are due are read as floats; the presets round-trip
    assert config_from_dict(_stored("train", "learning_rate", 1)).train.learning_rate == 1.0
    assert config_from_dict(config_to_dict(lgcn_jax.get_config("paper"))) == lgcn_jax.get_config("paper")


@pytest.mark.parametrize("override,message", [
    ("train.eval_every=0", "train.eval_every must be at least 1"),
    ("train.checkpoint_every=-1", "train.checkpoint_every must be at least 1"),
    ("train.keep_checkpoints=0", "train.keep_checkpoints must be at least 1"),
    ("train.learning_rate=nan", "train.learning_rate must be a positive number"),
    ("model.dropout_rate=1.5", r"model.dropout_rate must be in \[0, 1\)"),
    ("data.image_size=0", "data.image_size must be at least 8"),
])
def test_invalid_values_are_refused_before_anything_runs(override, message):
    with pytest.raises(ValueError, match=message):
        lgcn_jax.apply_overrides(lgcn_jax.get_config("quick"), [override])


def test_workdir_that_is_a_file_or_an_exported_model_is_refused(tmp_path):
    cfg = tiny_config()
    (tmp_path / "file").write_text("mine")
    with pytest.raises(lgcn_jax.CheckpointError, match="is a file, not a folder"):
        workdir.check_workdir_config(str(tmp_path / "file"), cfg)
    export = tmp_path / "export"
    export.mkdir()
    for f in ("config.json", "params.msgpack"):
        (export / f).write_bytes(open(os.path.join(RELEASED, f), "rb").read())
    before = {f: (export / f).read_bytes() for f in os.listdir(export)}
    with pytest.raises(lgcn_jax.CheckpointError, match="exported model folder, not a training workdir"):
        lgcn_jax.train_and_evaluate(cfg, str(export), progress=False)
    assert {f: (export / f).read_bytes() for f in os.listdir(export)} == before


def test_foreign_metrics_file_is_refused_and_kept(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"my": "metrics"}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl: record 1 .* is not an lgcn_jax metrics line"):
        MetricWriter(str(tmp_path))
    assert path.read_text() == '{"my": "metrics"}\n'


def test_model_paths_name_what_is_missing_and_create_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(lgcn_jax.CheckpointError, match=r"'synthetic_quick' is a released checkpoint: load_pretrained\('synthetic_quick'\)"):
        lgcn_jax.load_model("synthetic_quick")
    (tmp_path / "a.jpg").write_bytes(b"x")
    with pytest.raises(lgcn_jax.CheckpointError, match="a.jpg is a file; a model is a folder"):
        lgcn_jax.load_model("a.jpg")
    with pytest.raises(ValueError, match="which must be 'best' or 'last'"):
        lgcn_jax.load_model(RELEASED, which="newest")
    half = tmp_path / "half"
    half.mkdir()
    (half / "config.json").write_bytes(open(os.path.join(RELEASED, "config.json"), "rb").read())
    with pytest.raises(lgcn_jax.CheckpointError, match="neither params.msgpack .* nor last/ or best/"):
        lgcn_jax.load_model(str(half))
    assert os.listdir(half) == ["config.json"]


def test_library_calls_with_a_wrong_argument_say_what_is_due(tmp_path):
    model = lgcn_jax.load_pretrained("synthetic_quick")
    with pytest.raises(lgcn_jax.ImageError, match="a list of 1 images where one image is due; detect_batch"):
        lgcn_jax.detect(["a.jpg"], model)
    with pytest.raises(lgcn_jax.ImageError, match="is a folder, not an image"):
        lgcn_jax.detect(tmp_path, model)
    with pytest.raises(TypeError, match="pass model.params"):
        lgcn_jax.apply(model, np.zeros((1, 64, 64, 1), np.float32))
    with pytest.raises(ValueError, match="hold no pixels"):
        lgcn_jax.apply(model.params, np.zeros((0, 64, 64, 1), np.float32))
    with pytest.raises(ValueError, match="refine must be >= 0"):
        lgcn_jax.detect(np.zeros((64, 64), np.uint8), model, refine=-1)
    with pytest.raises(ValueError, match=r"min_confidence is a mean heatmap value in \[0, 1\]"):
        next(lgcn_jax.track([np.zeros((64, 64), np.uint8)], model, min_confidence=5))


def _export(folder, landmarks):
    folder.mkdir()
    n = len(landmarks)
    np.savez(folder / "train.npz", image=np.zeros((n, 32, 32, 1), np.uint8), landmarks=np.asarray(landmarks, np.float32))
    (folder / datasets.ARRAYS_META).write_text(json.dumps(
        {"format": datasets.ARRAYS_FORMAT, "dataset": "300w", "splits": {"train": {"file": "train.npz", "num_examples": n}}}))
    return DataConfig(dataset="300w", data_dir=str(folder), image_size=32)


def test_data_dirs_and_exports_that_cannot_be_right(tmp_path):
    good = np.full((2, 68, 2), 16.0)
    assert datasets.load_split(_export(tmp_path / "ok", good), "train")["landmarks"].shape == (2, 68, 2)
    bad = good.copy()
    bad[1, 3] = np.nan
    with pytest.raises(lgcn_jax.DatasetError, match=r"train.npz: the landmarks of 1 faces \(first: example 1\) are not finite"):
        datasets.load_split(_export(tmp_path / "nan", bad), "train")
    bad[1, 3] = 1e6
    with pytest.raises(lgcn_jax.DatasetError, match="lie far outside their 32x32 crop"):
        datasets.load_split(_export(tmp_path / "far", bad), "train")
    with pytest.raises(lgcn_jax.DatasetError, match=r"data dir .*missing does not exist; pass the folder"):
        datasets.load_split(DataConfig(dataset="300w", data_dir=str(tmp_path / "missing")), "train")
    with pytest.raises(lgcn_jax.DatasetError, match=r"train.npz is a file; data.data_dir \(--data_dir\) takes a folder"):
        datasets.load_split(DataConfig(dataset="300w", data_dir=str(tmp_path / "ok" / "train.npz")), "train")


def test_export_arrays_writes_nothing_over_a_users_files(synthetic_data_dir, tmp_path):
    cfg = DataConfig(data_dir=synthetic_data_dir)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "train.npz").write_bytes(b"my own arrays")
    with pytest.raises(lgcn_jax.DatasetError, match=r"mine is not empty: it holds other files \(train.npz\); nothing was written"):
        export_arrays(cfg, str(mine))
    assert (mine / "train.npz").read_bytes() == b"my own arrays"
    with pytest.raises(lgcn_jax.DatasetError, match="split 'foo' does not exist"):
        export_arrays(cfg, str(tmp_path / "new"), splits=["train", "foo"])
    assert not (tmp_path / "new").exists()
    with pytest.raises(lgcn_jax.DatasetError, match="is already an array export"):
        export_arrays(_export(tmp_path / "ok", np.full((1, 68, 2), 16.0)), str(tmp_path / "again"))


@pytest.mark.parametrize("argv,message", [
    (["--split", "common", "--batch_size", "0"], "--batch_size must be at least 1"),
    (["--split", " , "], "names no split"),
    (["--split", "common", "--out", "FILE"], "is a file; reports go to a folder"),
])
def test_run_eval_flags_are_checked_first(tmp_path, capsys, argv, message):
    (tmp_path / "FILE").write_text("mine")
    argv = [str(tmp_path / a) if a == "FILE" else a for a in argv]
    with pytest.raises(SystemExit) as e:
        cli_eval.main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert (tmp_path / "FILE").read_text() == "mine"


def test_run_train_flags(tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit):
        cli_train.parse_args(["--workdir", "w", "--recalibrate", "5"])
    assert "goes with --export" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)
    # Stored in config.json: absolute, so that commands from another folder find it.
    assert cli_train.parse_args(["--workdir", "w", "--data_dir", "exports/300w"]).data_dir == str(tmp_path / "exports" / "300w")


def test_lgcn_detect_names_every_result_once_and_checks_its_flags(tmp_path, capsys):
    from PIL import Image

    main = detect_main
    for name in ("a.jpg", "a.png", "a_2.jpg"):
        Image.fromarray(np.full((48, 64), 128, np.uint8)).save(tmp_path / name)
    out = tmp_path / "out"
    argv = [str(tmp_path / n) for n in ("a.jpg", "a.png", "a_2.jpg")] + ["--out", str(out), "--checkpoint", "synthetic_quick", "--no_progress"]
    assert main(argv) == 0
    results = sorted(f for f in os.listdir(out) if f.endswith(".json"))
    assert results == ["a.json", "a_2.json", "a_2_2.json"]
    assert [json.load(open(out / f))["image"] for f in results] == [str(tmp_path / n) for n in ("a.jpg", "a.png", "a_2.jpg")]
    for bad, message in ((["--detect_every", "0"], "--detect_every must be at least 1"),
                         (["--out", str(tmp_path / "a.jpg")], "is a file; results go to a folder")):
        with pytest.raises(SystemExit):
            main([str(tmp_path / "a.jpg"), "--out", str(out), *bad])
        assert message in capsys.readouterr().err


def test_build_300w_with_an_empty_manual_dir_says_what_it_expects(tmp_path, capsys):
    from data_prep import build_300w

    (tmp_path / "raw").mkdir()
    assert build_300w.main(["--manual_dir", str(tmp_path / "raw"), "--data_dir", str(tmp_path / "tfds")]) == 1
    assert "no 300-W subset folder under --manual_dir" in capsys.readouterr().err
    assert not (tmp_path / "tfds").exists()


def test_a_second_run_on_a_workdir_in_use_is_refused_and_writes_nothing(tmp_path):
    wd = str(tmp_path / "wd")
    with workdir.workdir_lock(wd):  # another run holds it (flock: a second open file conflicts even in one process)
        with pytest.raises(lgcn_jax.CheckpointError, match=r"wd is in use by another training run \(pid \d+ on .+\); wait"):
            lgcn_jax.train_and_evaluate(tiny_config(), wd, progress=False)
        assert os.listdir(wd) == [".lock"]
    with workdir.workdir_lock(wd):  # released with the holder
        pass
