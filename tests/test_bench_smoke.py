import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

import bench_kernel_conv  # noqa: E402


def test_kernel_conv_benchmark_runs_on_tiny_sizes(tmp_path):
    out = tmp_path / "r.json"
    result = bench_kernel_conv.main(["--batch", "1", "--size", "24", "--channels", "2", "--repeats", "1", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["pass"] for r in rows] == ["forward", "backward"] and result["rows"] == rows
    assert all(r["rel_err"] < 1e-5 and r["ours_s"] > 0 and r["direct_s"] > 0 for r in rows)
