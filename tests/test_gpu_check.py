"""The prepared device check (experiments/gpu_check.py) run on the CPU with tiny sizes, so the script that a
session with a GPU runs in one call cannot rot: every stage gives its row, failures are rows, not crashes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "gpu_check.py"


def _run(*args: str, tmp_path: Path) -> list[dict]:
    out = tmp_path / f"rows{len(list(tmp_path.glob('rows*.jsonl')))}.jsonl"  # a file per run: rows are appended
    cmd = [sys.executable, str(SCRIPT), "--device", "cpu", "--out", str(out), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    printed = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert printed == [json.loads(line) for line in out.read_text().splitlines()]  # printed = written
    return printed


def test_tiny_sizes_on_the_cpu_give_every_stage_its_row(tmp_path):
    rows = _run(
        "--scale-sizes", "tiny", "--dtypes", "float32", "--estimators", "sqnr", "gptq",
        "--search-size", "tiny", "--search-dtype", "float32", "--budget-s", "500", tmp_path=tmp_path,
    )  # fmt: skip
    kinds = [r["kind"] for r in rows]
    assert kinds == ["estimator", "estimator", "search", "search", "summary"], rows
    for row in rows[:2]:
        assert row["config"] == "tiny" and row["wall_s"] >= 0 and row["peak_over_weights"] >= 0
    for row, quantizer, target in zip(rows[2:4], ["rtn", "gptq"], ["llama.cpp", "mpsearch"]):
        assert row["quantizer"] == quantizer and row["target"] == target
        assert set(row["stages_s"]) == {"model", "quantizer", "estimate", "solve", "check", "evaluate"}
        assert row["avg_bits"] <= 4.5 + 1e-9 and row["perplexity"] > 0 and row["weight_bytes"] > 0
    assert rows[-1]["rows"] == {"estimator": 2, "search": 2}


def test_a_failing_stage_is_a_row_and_no_time_left_skips_the_rest(tmp_path):
    rows = _run("--scale-sizes", "--search-size", "tiny", "--quantizers", "rtn", "--target", "onnx", tmp_path=tmp_path)
    assert rows[0]["kind"] == "error" and "unknown target 'onnx'" in rows[0]["message"]
    rows = _run("--scale-sizes", "tiny", "--estimators", "sqnr", "--budget-s", "1", tmp_path=tmp_path)
    assert [r["kind"] for r in rows[:2]] == ["skipped"] * 2 and "budget left" in rows[0]["reason"]


def test_an_out_of_memory_in_a_search_is_a_row_with_its_message(monkeypatch, capsys):
    import torch

    sys.path.insert(0, str(ROOT / "experiments"))
    import gpu_check

    import mpsearch

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 28.00 GiB")

    monkeypatch.setattr(mpsearch, "search", oom)
    args = type(
        "A", (), {"size": "tiny", "dtype": "float32", "quantizer": "rtn", "device": "cpu", "target": "llama.cpp"}
    )
    assert gpu_check.search_child(args) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["kind"] == "error" and row["message"].startswith("out of memory: CUDA out of memory")


@pytest.mark.parametrize("size", ["8B", "1.1B"])
def test_the_large_configurations_are_the_shapes_the_issue_names(size):
    sys.path.insert(0, str(ROOT / "experiments"))
    from bench_scale import CONFIGS

    cfg = CONFIGS[size]
    want = {"8B": (4096, 32, 32, 8, 14336), "1.1B": (2048, 22, 32, 4, 5632)}[size]
    got = tuple(cfg[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads"))
    assert got + (cfg["intermediate_size"],) == want
    assert size != "8B" or cfg["vocab_size"] == 128256
