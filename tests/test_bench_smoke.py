"""The benchmark driver runs end to end on tiny sizes (no timing is asserted: numbers mean nothing here)."""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

import run_all  # noqa: E402


def test_run_all_tiny(tmp_path, synthetic_data_dir, capsys):
    out = tmp_path / "results.json"
    run_all.main(["--tiny", "--data_dir", synthetic_data_dir, "--out", str(out)])
    r = json.loads(out.read_text())
    assert [row["pass"] for row in r["kernel_conv"]["rows"]] == ["forward", "backward"]
    assert all(row["rel_err"] < 1e-5 for row in r["kernel_conv"]["rows"])
    assert [row["batch"] for row in r["network"]["rows"]] == [2]
    assert r["network"]["flops_per_image"]["total"] > 0
    assert r["postprocess"]["rows"][-1]["max_abs_diff_px"] < 0.05  # jnp and reference agree
    assert r["train"]["verdict"] in ("input-bound", "compute-bound")
    assert set(r["memory"]) == {"predict", "train"} and all(v["peak_rss_mib"] > 0 for v in r["memory"].values())
    assert "| kernel conv forward B=1 |" in capsys.readouterr().out
    for part in ("kernel_conv", "network", "postprocess", "train"):
        assert (tmp_path / f"results_{part}.json").exists()
