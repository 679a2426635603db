"""bench_quality's output contract on the smallest model (the full run is a benchmark, not a test)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_quality_benchmark_prints_rows_targets_and_plot(tmp_path):
    cmd = [
        sys.executable,
        str(ROOT / "experiments" / "bench_quality.py"),
        "--models",
        "digits-cnn",
        "--estimators",
        "sqnr",
        "--trials",
        "3",
        "--out",
        str(tmp_path),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT).stdout
    rows = [json.loads(line) for line in out.strip().splitlines()]
    methods = {r["method"] for r in rows}
    assert {"uniform-int8", "uniform-int4", "uniform-int3", "uniform-int4_g128", "uniform-fp8_e4m3"} <= methods
    assert {"sqnr+dp", "sqnr+evolutionary", "targets"} <= methods
    for r in rows:
        if r["method"] != "targets":
            assert {"model", "method", "avg_bits", "size_bytes", "metric_name", "metric"} <= set(r)
            assert r["metric"] == -r["loss"]  # neg_kl
    int4 = next(r for r in rows if r["method"] == "uniform-int4")
    for r in rows:
        if r.get("budget") == "0.875x int4":
            assert r["size_bytes"] <= 0.875 * int4["size_bytes"]
    assert (tmp_path / "quality_digits-cnn.png").stat().st_size > 10_000
