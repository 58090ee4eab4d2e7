"""Training that survives faults: a corrupt newest checkpoint, a corrupt best/, SIGTERM, non-finite losses, a full disk."""

import errno
import logging
import os
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import lgcn_jax
from data_prep.synthetic_faces import make_split
from lgcn_jax import checkpoint, logs
from lgcn_jax.errors import CheckpointError
from lgcn_jax.step import train_step
from lgcn_jax.train_state import create_train_state
from tests.conftest import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["model.num_filters=8", "model.local_5x5_layers=1", "model.local_3x3_layers=1", "model.global_layers=1", "model.global_dilation=2",
        "model.kernel_size=15", "model.kernel_sigmas=0.75,2.0,4.0", "model.dropout_rate=0", "data.image_size=32", "train.batch_size=4",
        "train.optimizer=adam", "train.learning_rate=1e-3", "train.lr_decay_steps=()", "train.lr_decay_factors=()",
        "train.checkpoint_every=2", "train.eval_every=1000", "train.log_every=1", "train.bn_recalibration_batches=1"]


def _trees_equal(a, b):
    return all(jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda u, v: bool(np.array_equal(u, v)), a, b)))


def _truncate_arrays(step_dir):
    """Cut every array data file in half, as a full disk or a half-finished copy leaves them."""
    n = 0
    for root, _, files in os.walk(step_dir):
        if os.path.basename(root) == "d":
            for f in files:
                path = os.path.join(root, f)
                os.truncate(path, os.path.getsize(path) // 2)
                n += 1
    assert n, f"no array files under {step_dir}"


def _steps(workdir, which="last"):
    return sorted(int(s) for s in os.listdir(os.path.join(workdir, which)) if s.isdigit())


def _config(data_dir, steps):
    return lgcn_jax.apply_overrides(tiny_config(num_steps=steps, eval_every=1000, checkpoint_every=2, bn_recalibration_batches=1),
                                    [f"data.data_dir={data_dir}"])


def test_truncated_newest_checkpoint_is_moved_aside_and_the_run_resumes_exactly(tmp_path, synthetic_data_dir, caplog):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    lgcn_jax.train_and_evaluate(_config(synthetic_data_dir, 6), a, progress=False)
    assert _steps(a) == [4, 6]
    _truncate_arrays(os.path.join(a, "last", "6"))
    with caplog.at_level("WARNING", logger="lgcn_jax"):
        lgcn_jax.train_and_evaluate(_config(synthetic_data_dir, 8), a, progress=False)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "does not restore" in r.getMessage()]
    assert len(warnings) == 1 and "last/6" in warnings[0] and "corrupt-6" in warnings[0] and "\n" not in warnings[0]
    assert os.path.isdir(os.path.join(a, "last", "corrupt-6")) and _steps(a) == [6, 8]
    lgcn_jax.train_and_evaluate(_config(synthetic_data_dir, 8), b, progress=False)
    pa, _ = lgcn_jax.load_params(a, which="last")
    pb, _ = lgcn_jax.load_params(b, which="last")
    assert _trees_equal(pa.params, pb.params)  # the same step-indexed data order from step 4 on
    assert os.path.getsize(os.path.join(a, logs.LOG_FILE)) > 0  # the full details went to the log file


def test_no_restorable_checkpoint_is_one_clear_error_and_nothing_moves(tmp_path, synthetic_data_dir):
    a = str(tmp_path / "a")
    lgcn_jax.train_and_evaluate(_config(synthetic_data_dir, 4), a, progress=False)
    for s in _steps(a):
        _truncate_arrays(os.path.join(a, "last", str(s)))
    with pytest.raises(CheckpointError, match=r"none of the 2 checkpoints in .*last restores.*Nothing was moved") as e:
        lgcn_jax.train_and_evaluate(_config(synthetic_data_dir, 6), a, progress=False)
    assert "fresh --workdir" in str(e.value)
    assert _steps(a) == [2, 4] and not [s for s in os.listdir(os.path.join(a, "last")) if "corrupt" in s]


def _cli(script, args, **kw):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], capture_output=True, text=True, env=env, **kw)


def test_corrupt_best_is_one_clear_line(trained_workdir, tmp_path):
    import shutil

    wd = tmp_path / "wd"
    shutil.copytree(trained_workdir, wd)
    best = _steps(str(wd), "best")[-1]
    _truncate_arrays(wd / "best" / str(best))
    r = _cli("run_eval.py", ["--workdir", str(wd), "--split", "test", "--no_progress", "--out", str(tmp_path / "e")], timeout=300)
    assert r.returncode == 1
    lines = [line for line in r.stderr.splitlines() if line.strip() and "oneDNN" not in line and "absl::InitializeLog" not in line]
    assert len(lines) == 1, r.stderr[-3000:]
    assert f"best/{best} does not restore" in lines[0] and "--which last" in lines[0]
    r = _cli("run_eval.py", ["--workdir", str(wd), "--split", "test", "--no_progress", "--which", "last", "--out", str(tmp_path / "e")], timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


def test_sigterm_checkpoints_the_current_step_and_resumes_exactly(tmp_path, synthetic_data_dir):
    wd, ref = str(tmp_path / "wd"), str(tmp_path / "ref")
    args = ["--workdir", wd, "--no_progress", "--config", f"data.data_dir={synthetic_data_dir}", *TINY, "train.checkpoint_every=1000"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "run_train.py"), *args, "train.num_steps=100000"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = os.path.join(wd, "metrics.jsonl")
    deadline = time.time() + 240
    try:
        while time.time() < deadline:
            if os.path.exists(metrics) and sum(1 for line in open(metrics) if "train/loss" in line) >= 3:
                break
            time.sleep(0.1)
        else:
            pytest.fail("training never logged three steps")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, err[-2000:]
    stopped = _steps(wd)
    assert len(stopped) == 1 and f"stopped by SIGTERM after step {stopped[0]}" in err
    target = stopped[0] + 2
    r = _cli("run_train.py", args + [f"train.num_steps={target}"], timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    r = _cli("run_train.py", ["--workdir", ref, *args[2:], f"train.num_steps={target}"], timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    pa, _ = lgcn_jax.load_params(wd, which="last")
    pb, _ = lgcn_jax.load_params(ref, which="last")
    assert _trees_equal(pa.params, pb.params)


def test_nonfinite_batch_is_skipped_when_asked():
    images, lms = make_split("train", 4, image_size=32)
    good = {"image": jnp.asarray(images[..., None] / 255.0, jnp.float32), "landmarks": jnp.asarray(lms)}
    bad = {"image": good["image"].at[0, 3, 3, 0].set(jnp.nan), "landmarks": good["landmarks"]}
    state = create_train_state(tiny_config())
    before = jax.tree_util.tree_map(np.asarray, state.net.params)
    state, m = train_step(state, bad, skip_nonfinite=True)
    assert int(m["skipped"]) == 1 and not np.isfinite(float(m["loss"])) and int(state.step) == 1
    assert _trees_equal(state.net.params, before)
    state, m = train_step(state, good, skip_nonfinite=True)
    assert int(m["skipped"]) == 0 and int(state.step) == 2 and not _trees_equal(state.net.params, before)
    state, m = train_step(state, bad)  # without the option the update goes through
    assert not np.all(np.isfinite(np.asarray(state.net.params["head_main"]["kernel"])))


def test_nonfinite_loss_stops_with_the_step_and_the_last_good_checkpoint(tmp_path, synthetic_data_dir):
    wd = str(tmp_path / "wd")
    cfg = lgcn_jax.apply_overrides(_config(synthetic_data_dir, 6), ["train.learning_rate=1e30", "train.log_every=1"])
    with pytest.raises(FloatingPointError, match=r"loss became nan at step \d+; (the newest checkpoint is .*last/\d+|no checkpoint)") as e:
        lgcn_jax.train_and_evaluate(cfg, wd, progress=False)
    named = re.search(r"last/(\d+)", str(e.value))
    assert (int(named.group(1)) in _steps(wd)) if named else not _steps(wd), (str(e.value), _steps(wd))  # it exists
    for s in _steps(wd):  # every checkpoint written holds finite parameters
        p = checkpoint.Checkpoints(wd).restore(s, create_train_state(cfg))
        assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(p.net.params))
    skip = lgcn_jax.apply_overrides(cfg, ["train.skip_nonfinite=true"])
    lgcn_jax.train_and_evaluate(skip, str(tmp_path / "skip"), progress=False)
    from lgcn_jax.metric_writer import read_metrics

    counts = [r["train/skipped_batches"] for r in read_metrics(str(tmp_path / "skip")) if "train/skipped_batches" in r]
    assert counts[-1] >= 1 and counts == sorted(counts)


def test_failing_write_names_the_workdir_and_keeps_earlier_checkpoints(tmp_path, synthetic_data_dir, monkeypatch):
    wd = str(tmp_path / "wd")
    lgcn_jax.train_and_evaluate(_config(synthetic_data_dir, 4), wd, progress=False)
    assert _steps(wd) == [2, 4]
    original = ocp.StandardCheckpointHandler.async_save

    async def full_disk(self, directory, *a, **kw):
        with open(os.path.join(str(directory), "partial"), "wb") as f:
            f.write(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", full_disk)
    with pytest.raises(CheckpointError, match=r"could not write the checkpoint of step 6 to .*wd/last .*No space left.*intact"):
        lgcn_jax.train_and_evaluate(_config(synthetic_data_dir, 8), wd, progress=False)
    monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", original)
    assert _steps(wd) == [2, 4]  # nothing deleted, no partial step taken for a checkpoint
    state, step = checkpoint.Checkpoints(wd).restore_latest(create_train_state(_config(synthetic_data_dir, 8)))
    assert step == 4 and int(state.step) == 4


def test_orbax_read_errors_after_a_failed_restore_go_to_the_log_file(tmp_path, caplog):
    path = logs.log_details_to(str(tmp_path))
    logs.quiet_failed_restores()  # what the command-line programs and train_and_evaluate install
    asyncio_log = logging.getLogger("asyncio")
    orbax_task = ("Task exception was never retrieved\nfuture: <Task finished name='Task-287' coro=<async_deserialize() done, "
                  "defined at /venv/orbax/checkpoint/_src/serialization/serialization.py:394> exception=Exception('reading array index')>")
    with caplog.at_level(logging.ERROR):
        asyncio_log.error(orbax_task)
        asyncio_log.error("Task exception was never retrieved\nfuture: <Task finished coro=<mine()>>")  # not orbax's: shown
    assert [r.getMessage().splitlines()[-1] for r in caplog.records] == ["future: <Task finished coro=<mine()>>"]
    for h in logging.getLogger("lgcn_jax.details").handlers:
        h.flush()
    assert "async_deserialize" in open(path).read()
