import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lgcn_jax
from data_prep.synthetic_faces import make_split
from lgcn_jax import checkpoint, workdir
from lgcn_jax.cli import train as cli_train
from lgcn_jax.config import read_config, write_config
from lgcn_jax.errors import CheckpointError
from lgcn_jax.evaluation import eval_step
from lgcn_jax.step import train_step
from lgcn_jax.train_state import create_train_state
from tests.conftest import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _trees_equal(a, b):
    return all(jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda u, v: bool(np.array_equal(u, v)), a, b)))


def test_tiny_net_overfits_a_handful_of_faces():
    images, lms = make_split("train", 4, image_size=32)
    batch = {"image": jnp.asarray(images[..., None] / 255.0, jnp.float32), "landmarks": jnp.asarray(lms)}
    cfg = tiny_config(learning_rate=1e-2)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_filters=16, local_5x5_layers=2, local_3x3_layers=2))
    state = create_train_state(cfg)
    before = float(np.mean(lgcn_jax.metrics.nme(np.asarray(eval_step(state.net, batch["image"])), lms)))
    losses = []
    for _ in range(200):
        state, m = train_step(state, batch)
        losses.append(float(m["loss"]))
    after = float(np.mean(lgcn_jax.metrics.nme(np.asarray(eval_step(state.net, batch["image"])), lms)))
    assert losses[-1] < 0.2 * losses[0]
    # Inference mode (BatchNorm statistics of the last batch) must localise the faces it saw.
    assert after < 0.2 * before and after < 0.1, (before, after)


def test_train_step_is_deterministic():
    images, lms = make_split("train", 4, image_size=32)
    batch = {"image": jnp.asarray(images[..., None] / 255.0, jnp.float32), "landmarks": jnp.asarray(lms)}
    cfg = tiny_config(optimizer="momentum", learning_rate=0.01, grad_clip=0.1)
    outs = []
    for _ in range(2):
        s = create_train_state(cfg)
        for _ in range(3):
            s, _ = train_step(s, batch)
        outs.append(s)
    assert _trees_equal(outs[0].net.params, outs[1].net.params)
    assert int(outs[0].step) == 3


def test_checkpoint_round_trip(tmp_path):
    cfg = tiny_config()
    state = create_train_state(cfg, jax.random.key(3))
    ck = checkpoint.Checkpoints(str(tmp_path), keep=2)
    ck.save(7, state)
    fresh = create_train_state(cfg, jax.random.key(4))
    restored = ck.restore(7, fresh)
    ck.close()
    assert int(restored.step) == int(state.step)
    assert _trees_equal(restored.net.params, state.net.params)
    assert _trees_equal(restored.opt_state, state.opt_state)
    assert not _trees_equal(fresh.net.params, state.net.params)


def test_corrupt_checkpoint_gives_clear_error(tmp_path):
    cfg = tiny_config()
    state = create_train_state(cfg)
    ck = checkpoint.Checkpoints(str(tmp_path))
    ck.save(1, state)
    for root, _, files in os.walk(tmp_path / "last" / "1"):
        for f in files:
            if "manifest" in f or f.endswith(".ocdbt") or "d" == f[:1]:
                with open(os.path.join(root, f), "wb") as fh:
                    fh.write(b"garbage")
    with pytest.raises(CheckpointError, match="cannot restore"):
        ck.restore(1, state)
    ck.close()


def test_resume_continues_exactly(tmp_path, synthetic_data_dir):
    """4 steps, stop, resume to 6 == 6 steps in one go."""
    cfg = lgcn_jax.apply_overrides(tiny_config(num_steps=4, eval_every=100, checkpoint_every=2), [f"data.data_dir={synthetic_data_dir}"])
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    lgcn_jax.train_and_evaluate(cfg, a, progress=False)
    cfg6 = lgcn_jax.apply_overrides(cfg, ["train.num_steps=6"])
    res_a = lgcn_jax.train_and_evaluate(cfg6, a, progress=False)
    res_b = lgcn_jax.train_and_evaluate(cfg6, b, progress=False)
    pa, _ = lgcn_jax.load_params(a, which="last")
    pb, _ = lgcn_jax.load_params(b, which="last")
    assert _trees_equal(pa.params, pb.params) and _trees_equal(pa.batch_stats, pb.batch_stats)
    assert res_a["nme"] == res_b["nme"]
    assert sorted(int(s) for s in os.listdir(os.path.join(a, "last")) if s.isdigit()) == [4, 6]


def _run(args, **kw):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, os.path.join(ROOT, "run_train.py"), *args], capture_output=True, text=True, env=env, **kw)


def test_cli_bad_flag():
    r = _run(["--workdir", "/tmp/x", "--bogus"], timeout=120)
    assert r.returncode == 2 and "unrecognized arguments: --bogus" in r.stderr
    r = _run(["--workdir", "/tmp/x", "--config", "model.num_filtres=3"], timeout=120)
    assert r.returncode == 2 and "unknown config key 'model.num_filtres'" in r.stderr


def test_cli_refuses_incompatible_workdir(tmp_path):
    wd = tmp_path / "wd"
    write_config(str(wd), lgcn_jax.get_config("quick"))
    (wd / "last").mkdir()
    (wd / "last" / "keep.txt").write_text("user data")
    before = (wd / "config.json").read_text()
    r = _run(["--workdir", str(wd), "--preset", "paper64"], timeout=120)
    assert r.returncode == 1
    assert "different network" in r.stderr and "model.num_filters: stored 16, requested 64" in r.stderr
    assert "config.json" in r.stderr and "Nothing was changed" in r.stderr
    assert (wd / "config.json").read_text() == before and (wd / "last" / "keep.txt").read_text() == "user data"


def test_sigkill_mid_run_then_resume(tmp_path, synthetic_data_dir):
    wd = str(tmp_path / "wd")
    args = ["--workdir", wd, "--no_progress", "--config", f"data.data_dir={synthetic_data_dir}",
            "model.num_filters=8", "model.local_5x5_layers=1", "model.local_3x3_layers=1", "model.global_layers=1",
            "train.batch_size=4", "train.checkpoint_every=2", "train.eval_every=1000", "train.log_every=1000"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "run_train.py"), *args, "train.num_steps=100000"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = os.path.join(wd, "last")
    deadline = time.time() + 240
    try:
        while time.time() < deadline:
            steps = [int(s) for s in os.listdir(last) if s.isdigit()] if os.path.isdir(last) else []
            if steps and max(steps) >= 4:
                break
            time.sleep(0.2)
        else:
            pytest.fail("training never wrote a checkpoint")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    killed_at = max(int(s) for s in os.listdir(last) if s.isdigit())
    target = killed_at + 2
    r = _run(args + [f"train.num_steps={target}"], timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    steps = sorted(int(s) for s in os.listdir(last) if s.isdigit())
    assert steps[-1] == target and killed_at in steps
    assert not [s for s in os.listdir(last) if "tmp" in s]  # no half-written checkpoint left behind
    params, cfg = lgcn_jax.load_params(wd, which="last")
    assert cfg.train.num_steps == target and params.config.num_filters == 8


def test_export_workdir_recalibrates_and_never_overwrites(trained_workdir, tmp_path, capsys):
    out = tmp_path / "release"
    assert cli_train.main(["--workdir", trained_workdir, "--export", str(out), "--recalibrate", "2"]) == 0
    model = lgcn_jax.load_model(str(out))
    best = lgcn_jax.load_model(trained_workdir)
    assert _trees_equal(model.params.params, best.params.params)
    assert not _trees_equal(model.params.batch_stats, best.params.batch_stats)  # measured again over 2 batches
    assert sorted(os.listdir(out)) == ["config.json", "params.msgpack", "shape_model.npz"]
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}
    capsys.readouterr()
    assert cli_train.main(["--workdir", trained_workdir, "--export", str(out)]) == 1
    assert "is not empty; nothing was written" in capsys.readouterr().err
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before


def test_workdir_of_another_dataset_is_refused(trained_workdir):
    stored = read_config(trained_workdir)
    other = dataclasses.replace(stored, data=dataclasses.replace(stored.data, dataset="300w"))
    with pytest.raises(lgcn_jax.CheckpointError, match="data.dataset: stored 'synthetic', requested '300w'"):
        workdir.check_workdir_config(trained_workdir, other)


@pytest.mark.parametrize("field, value", [("dilation_as_phases", False), ("compute_dtype", "bfloat16"), ("fused_batch_norm", False),
                                          ("fold_batch_norm", False), ("blur_features", False)])
def test_workdir_resumes_with_another_execution_setting(trained_workdir, field, value):
    """The execution settings change how the network runs, not its weights: no refusal."""
    stored = read_config(trained_workdir)
    assert getattr(stored.execution, field) != value
    other = dataclasses.replace(stored, execution=dataclasses.replace(stored.execution, **{field: value}))
    assert workdir.check_workdir_config(trained_workdir, other) == stored


def test_fine_tuning_starts_from_the_weights_of_init_from(trained_workdir, tmp_path):
    """train.init_from: a fresh run starts from another run's best weights, not random ones; resuming ignores it."""
    from lgcn_jax.metric_writer import read_metrics

    src, src_cfg = lgcn_jax.load_params(trained_workdir)
    wd = str(tmp_path / "ft")
    # Dropout is the fine-tuning run's own choice (it acts in training only; the source trained without).
    cfg = lgcn_jax.apply_overrides(src_cfg, [f"train.init_from={trained_workdir}", "train.learning_rate=1e-12", "model.dropout_rate=0.2",
                                             "train.num_steps=2", "train.checkpoint_every=2", "train.eval_every=2"])
    lgcn_jax.train_and_evaluate(cfg, wd, progress=False)
    tuned, stored = lgcn_jax.load_params(wd, which="last")
    assert stored.train.init_from == trained_workdir
    close = jax.tree_util.tree_map(lambda a, b: bool(np.allclose(a, b, rtol=0, atol=1e-8)), tuned.params, src.params)
    assert all(jax.tree_util.tree_leaves(close))  # two steps at a learning rate of 1e-12
    # What the run would have started from without init_from (the same seed; the source moved 4 Adam steps from it).
    fresh = create_train_state(cfg).net.params
    assert max(float(np.abs(a - b).max()) for a, b in zip(jax.tree_util.tree_leaves(fresh), jax.tree_util.tree_leaves(src.params))) > 1e-3
    # Step 0 validates the source's weights: the same faces and BatchNorm recalibration give its last NME.
    val = lambda wd: [r for r in read_metrics(wd) if "val/nme" in r]
    assert val(wd)[0]["step"] == 0
    assert val(wd)[0]["val/nme"] == pytest.approx(val(trained_workdir)[-1]["val/nme"], rel=1e-5)
    assert val(wd)[0]["val/nme"] < 0.9 * val(trained_workdir)[0]["val/nme"]  # far from the untrained network's
    # A run that resumes restores its own checkpoint: init_from is not read again.
    gone = lgcn_jax.apply_overrides(cfg, [f"train.init_from={tmp_path / 'moved_away'}", "train.num_steps=4"])
    lgcn_jax.train_and_evaluate(gone, wd, progress=False)
    assert sorted(int(s) for s in os.listdir(os.path.join(wd, "last")) if s.isdigit()) == [2, 4]


def test_init_from_of_another_network_or_unknown_name_is_refused(trained_workdir, tmp_path):
    _, src_cfg = lgcn_jax.load_params(trained_workdir)
    wd = tmp_path / "ft"
    other = lgcn_jax.apply_overrides(src_cfg, [f"train.init_from={trained_workdir}", "model.num_filters=4"])
    with pytest.raises(CheckpointError) as e:
        lgcn_jax.train_and_evaluate(other, str(wd), progress=False)
    assert f"train.init_from={trained_workdir!r}" in str(e.value) and "model.num_filters: stored 8, requested 4" in str(e.value)
    assert "with its own network (the network settings of its config.json)" in str(e.value)  # the tiny network is no preset
    with pytest.raises(CheckpointError, match=r"(?s)model.num_filters: stored 128, requested 8.*\(run_train.py --preset paper\)"):
        lgcn_jax.train_and_evaluate(lgcn_jax.apply_overrides(src_cfg, ["train.init_from=300w_paper"]), str(wd), progress=False)
    unknown = lgcn_jax.apply_overrides(src_cfg, ["train.init_from=no_such_weights"])
    with pytest.raises(CheckpointError, match="no released checkpoint of that name.*available: .*300w_paper"):
        lgcn_jax.train_and_evaluate(unknown, str(wd), progress=False)
    assert not wd.exists()  # refused before anything was written


def test_cli_init_from_folder_is_stored_absolute_and_a_name_as_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "a").mkdir(parents=True)
    assert cli_train.parse_args(["--workdir", "w", "--init_from", "runs/a"]).init_from == str(tmp_path / "runs" / "a")
    assert cli_train.parse_args(["--workdir", "w", "--init_from", "300w_paper"]).init_from == "300w_paper"


def test_export_calibrates_x_offset_on_the_validation_faces(trained_workdir, tmp_path, capsys):
    """--calibrate_x_offset stores the mean horizontal residual of the validation split (not a test split), so the
    exported model's x is unbiased there; the offset moves every decoded x and nothing else."""
    from lgcn_jax import datasets, evaluation, train

    best = lgcn_jax.load_model(trained_workdir)
    val = datasets.load_split(best.config.data, "validation")
    want = evaluation.horizontal_offset(best, val)
    out = tmp_path / "calibrated"
    assert cli_train.main(["--workdir", trained_workdir, "--export", str(out), "--calibrate_x_offset"]) == 0
    model = lgcn_jax.load_model(str(out))
    assert model.config.postprocess.x_offset == pytest.approx(want, abs=1e-4) and model.config.postprocess.x_offset != 0.0
    assert _trees_equal(model.params.params, best.params.params)
    pred = evaluation.predict_landmarks(model, val)
    assert abs(np.mean(val["landmarks"][..., 0] - pred[..., 0])) < 1e-4
    base = evaluation.predict_landmarks(best, val)
    np.testing.assert_allclose(pred - base, np.broadcast_to([model.config.postprocess.x_offset, 0.0], base.shape), atol=1e-4)
    # horizontal_offset measures the decoding without the model's own offset; labels moved right by 0.5 px add 0.5
    assert evaluation.horizontal_offset(model, val) == pytest.approx(want, abs=1e-6)
    moved = dict(val, landmarks=val["landmarks"] + np.array([0.5, 0.0], np.float32))
    assert evaluation.horizontal_offset(best, moved) == pytest.approx(want + 0.5, abs=1e-5)
    with pytest.raises(SystemExit):
        cli_train.main(["--workdir", trained_workdir, "--calibrate_x_offset"])
    assert "--calibrate_x_offset goes with --export" in capsys.readouterr().err
    # a 300-W run without held-out faces would calibrate on the test subset: refused before any data is read
    no_holdout = tmp_path / "no_holdout"
    shutil.copytree(trained_workdir, no_holdout)
    cfg = json.loads((no_holdout / "config.json").read_text())
    cfg["data"].update(dataset="300w", validation_faces=0)
    (no_holdout / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="needs faces held out of train"):
        train.export_workdir(str(no_holdout), str(tmp_path / "never"), calibrate_x_offset=True)
    assert not (tmp_path / "never").exists()
    with pytest.raises(ValueError, match="x_offset must be a finite number"):
        model.with_postprocess(x_offset=float("nan"))


OLD_WORKDIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "workdir_v0_1")


def test_a_workdir_written_by_lgcn_jax_0_1_loads_resumes_and_exports(tmp_path, synthetic_data_dir):
    """tests/data/workdir_v0_1: a tiny run written by lgcn_jax 0.1 (orbax checkpoints at step 2, its config.json
    with the execution settings in "model", dilation_as_phases=false there).  It loads with the same weights and
    settings, resumes to step 4 under the current code, and exports a model folder that loads back."""
    wd = tmp_path / "old"
    shutil.copytree(OLD_WORKDIR, wd)
    stored = json.loads((wd / "config.json").read_text())
    assert "execution" not in stored and stored["model"]["dilation_as_phases"] is False
    model = lgcn_jax.load_model(str(wd))
    assert model.execution.dilation_as_phases is False and model.params.config.num_filters == 8
    np.testing.assert_allclose(np.ravel(model.params.params["head_main"]["kernel"])[:3], [-0.00245681, 0.05058024, -0.00846357], rtol=1e-6)
    cfg = lgcn_jax.apply_overrides(read_config(str(wd)), [f"data.data_dir={synthetic_data_dir}", "train.num_steps=4"])
    lgcn_jax.train_and_evaluate(cfg, str(wd), progress=False)
    assert sorted(int(s) for s in os.listdir(wd / "last") if s.isdigit())[-1] == 4
    assert json.loads((wd / "config.json").read_text())["execution"]["dilation_as_phases"] is False  # written in today's layout
    out = tmp_path / "release"
    assert cli_train.main(["--workdir", str(wd), "--export", str(out)]) == 0
    again = lgcn_jax.load_model(str(out))
    assert again.execution.dilation_as_phases is False
    assert _trees_equal(again.params.params, lgcn_jax.load_model(str(wd)).params.params)


def test_loading_a_model_installs_nothing_and_writes_nothing(tmp_path):
    """load_model / load_params only read: no log file in the folder, no process-wide hooks (the programs and
    train_and_evaluate install those for themselves)."""
    import logging

    wd = tmp_path / "old"
    shutil.copytree(OLD_WORKDIR, wd)
    before = sorted(os.listdir(wd))
    hook, filters = sys.unraisablehook, list(logging.getLogger("asyncio").filters)
    lgcn_jax.load_model(str(wd))
    lgcn_jax.load_params(str(wd), which="last")
    assert sorted(os.listdir(wd)) == before and "lgcn.log" not in before
    assert sys.unraisablehook is hook and logging.getLogger("asyncio").filters == filters


def test_distillation_from_a_teacher_workdir(trained_workdir, synthetic_data_dir, tmp_path):
    """train.distill_from: the teacher's maps of every training face are computed once, kept in the workdir, read
    back on resume; they change the step's loss; a teacher of other crops is refused before anything is written."""
    from lgcn_jax import datasets, train

    base = lgcn_jax.apply_overrides(tiny_config(num_steps=2, eval_every=2, checkpoint_every=2, bn_recalibration_batches=1),
                                    [f"data.data_dir={synthetic_data_dir}"])
    cfg = lgcn_jax.apply_overrides(base, [f"train.distill_from={trained_workdir}", "train.distill_weight=0.5"])
    wd = tmp_path / "student"
    lgcn_jax.train_and_evaluate(cfg, str(wd), progress=False)
    with np.load(wd / train.TEACHER_FILE) as z:
        maps = z["maps"]
    teacher = lgcn_jax.load_model(trained_workdir)
    data = datasets.load_split(cfg.data, "train")
    assert maps.shape == (len(data["image"]), 32, 32, 68) and maps.dtype == np.float16
    want = np.asarray(lgcn_jax.apply(teacher.params, data["image"][:2]))
    np.testing.assert_allclose(maps[:2].astype(np.float32), want, atol=2e-3 * np.abs(want).max() + 1e-4)  # f16
    stamp = os.path.getmtime(wd / train.TEACHER_FILE)
    lgcn_jax.train_and_evaluate(lgcn_jax.apply_overrides(cfg, ["train.num_steps=4"]), str(wd), progress=False)
    assert os.path.getmtime(wd / train.TEACHER_FILE) == stamp  # read back, not computed again
    plain = str(tmp_path / "plain")
    lgcn_jax.train_and_evaluate(base, plain, progress=False)
    assert not _trees_equal(lgcn_jax.load_params(plain, "last")[0].params, lgcn_jax.load_params(str(wd), "last")[0].params)
    with pytest.raises(CheckpointError, match="a teacher must see the same crops"):
        lgcn_jax.train_and_evaluate(lgcn_jax.apply_overrides(base, ["train.distill_from=300w_cpu"]), str(tmp_path / "other"), progress=False)


def test_export_tunes_the_decoding_on_the_validation_faces(trained_workdir, tmp_path, monkeypatch):
    """--tune_decoding: the exported peak_fit_radius is the candidate with the lowest NME on the validation split,
    with that radius's own x_offset; decoding the exported model on those faces gives that NME."""
    from lgcn_jax import datasets, evaluation

    monkeypatch.setattr(evaluation, "PEAK_FIT_RADII", (1, 3, 8))  # fewer candidates: each compiles its decoding
    best = lgcn_jax.load_model(trained_workdir)
    val = datasets.load_split(best.config.data, "validation")
    _, table = evaluation.tune_decoding(best, val)
    out = tmp_path / "tuned"
    assert cli_train.main(["--workdir", trained_workdir, "--export", str(out), "--tune_decoding"]) == 0
    model = lgcn_jax.load_model(str(out))
    key = (model.postprocess.peak_fit_radius, tuple(model.postprocess.local_windows))
    assert table[key][1] == min(nme for _, nme in table.values()) and model.postprocess.x_offset == table[key][0]
    got = evaluation.evaluate_landmarks(evaluation.predict_landmarks(model, val), val["landmarks"])["inter_ocular"]["nme"]
    assert got == pytest.approx(table[key][1], rel=1e-4)
    # Every radius with the model's own windows; the other windows at the radius that was best with those.
    own = tuple(best.postprocess.local_windows)
    radius = min((r for r, w in table if w == own), key=lambda r: table[(r, own)][1])
    assert set(table) == {(1, own), (3, own), (8, own)} | {(radius, w) for w in evaluation.LOCAL_WINDOWS}
