"""Batch grid: tables reused, kill -9 at any point and a re-run finishes without redoing or losing cells."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from mpsearch.batch import BatchConfig
from mpsearch.cli import main

CONFIG = """
models = ["digits-cnn"]
estimators = ["sqnr", "hessian"]
solvers = ["dp", "greedy"]
budgets = [{avg_bits = 3.5}, {avg_bits = 4.0}, {avg_bits = 5.0}, {size_fraction = 0.6}]
"""


def test_kill_9_then_resume_finishes_the_grid(tmp_path):
    cfg = tmp_path / "grid.toml"
    run_dir = tmp_path / "run"
    cfg.write_text(f'run_dir = "{run_dir}"\n' + CONFIG)
    env = {**os.environ, "MPSEARCH_BATCH_CELL_DELAY": "0.4", "TQDM_DISABLE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mpsearch.cli", "batch", str(cfg)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    cells = run_dir / "cells"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(cells.glob("*/metrics.json"))) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = {p.parent.name: p.stat().st_mtime_ns for p in cells.glob("*/metrics.json")}
    assert 3 <= len(done_before) < 16, "the kill must land mid-grid"
    for p in cells.glob("*/metrics.json"):
        json.loads(p.read_text())  # every finished cell's file is whole
    tables_before = {p.name: p.stat().st_mtime_ns for p in (run_dir / "tables").glob("*.parquet")}

    assert main(["batch", str(cfg)]) == 0
    after = {p.parent.name: p.stat().st_mtime_ns for p in cells.glob("*/metrics.json")}
    assert len(after) == 16
    assert all(after[name] == mtime for name, mtime in done_before.items()), "finished cells were redone"
    for name, mtime in tables_before.items():  # tables are computed once per (model, estimator) and reused
        assert (run_dir / "tables" / name).stat().st_mtime_ns == mtime
    assert len(list((run_dir / "tables").glob("*.parquet"))) == 2
    results = pd.read_parquet(run_dir / "results.parquet")
    assert len(results) == 16 and set(results["estimator"]) == {"sqnr", "hessian"}
    assert (
        results.loc[results.budget_kind == "avg_bits", "avg_bits"]
        <= results.loc[results.budget_kind == "avg_bits", "budget_value"] + 1e-9
    ).all()
    assert pd.read_csv(run_dir / "results.csv").shape[0] == 16
    assert (run_dir / "summary.png").stat().st_size > 10_000
    for cell in cells.iterdir():
        assert (cell / "plan.json").exists()


def test_bad_configs_are_rejected(tmp_path):
    from mpsearch.core import MpsearchError

    with pytest.raises(MpsearchError, match="does not exist"):
        BatchConfig.load(tmp_path / "nope.toml")
    (tmp_path / "a.toml").write_text('models = ["digits-cnn"]\n')
    with pytest.raises(MpsearchError, match="estimators must be a non-empty list, got None"):
        BatchConfig.load(tmp_path / "a.toml")
    (tmp_path / "b.toml").write_text(CONFIG.replace("{avg_bits = 3.5}", "{bits = 3}"))
    with pytest.raises(MpsearchError, match="is not one of"):
        BatchConfig.load(tmp_path / "b.toml")


def test_shipped_config_parses():
    cfg = BatchConfig.load(Path(__file__).resolve().parents[1] / "experiments" / "configs" / "memory_grid.toml")
    assert {m.name for m in cfg.models} == {"digits-cnn", "minilm-l6", "efficientnet-lite0"}
    assert any("size_fraction" in b for b in cfg.budgets)


def test_the_whole_grid_is_validated_before_any_cell_one_line_per_problem(tmp_path, capsys):
    bad = """
run_dir = "r"
models = ["digits-cnn", "resnet-9000"]
estimators = "sqnr"
solvers = []
budgets = [{avg_bits = -1}, {bits = 3}, {size_fraction = true}]
options = ["int4", "int9"]
option = ["int4"]
"""
    (tmp_path / "bad.toml").write_text(bad)
    code = main(["batch", str(tmp_path / "bad.toml")])
    err = capsys.readouterr().err
    assert code == 2 and "8 problems:" in err
    for line in (
        "unknown key 'option'",
        "unknown model 'resnet-9000'",
        "estimators must be a non-empty list, got 'sqnr'",
        "solvers must be a non-empty list, got []",
        "budget avg_bits = -1 must be a positive number",
        "budget {'bits': 3} is not one of",
        "budget size_fraction = True must be a positive number",
        "unknown option 'int9'",
    ):
        assert err.count(line) == 1, line
    assert not (tmp_path / "r").exists()  # nothing ran


def test_an_infeasible_cell_is_a_result_row_and_the_grid_goes_on(tmp_path):
    from mpsearch.batch import run_batch

    cfg = tmp_path / "grid.toml"
    cfg.write_text(
        f'run_dir = "{tmp_path / "run"}"\nmodels = ["digits-cnn"]\nestimators = ["sqnr"]\nsolvers = ["dp"]\n'
        'budgets = [{avg_bits = 1.0}, {avg_bits = 6.0}]\noptions = ["int2", "int4", "int8"]\n'
    )
    results = run_batch(BatchConfig.load(cfg), progress=False)
    by_budget = results.set_index("budget_value")
    assert by_budget.loc[1.0, "status"] == "infeasible" and "infeasible" in by_budget.loc[1.0, "reason"]
    assert by_budget.loc[6.0, "status"] == "optimal" and by_budget.loc[6.0, "avg_bits"] <= 6.0
    again = run_batch(BatchConfig.load(cfg), progress=False)  # a re-run completes: nothing left to do
    assert again.equals(results)


def test_a_full_disk_mid_run_is_one_line_and_a_rerun_resumes_without_redoing_a_cell(tmp_path, monkeypatch):
    import errno

    from mpsearch.batch import run_batch
    from mpsearch.core import MpsearchError

    cfg = tmp_path / "grid.toml"
    cfg.write_text(
        f'run_dir = "{tmp_path / "run"}"\nmodels = ["digits-cnn"]\nestimators = ["sqnr"]\nsolvers = ["dp"]\n'
        "budgets = [{avg_bits = 4.0}, {avg_bits = 6.0}]\n"
    )
    real, writes = Path.write_text, []

    def fills_up(path, text, *args, **kwargs):
        writes.append(path)
        if len(writes) > 2:  # plan.json and metrics.json of the first cell fit; then the disk is full
            real(path, text[: len(text) // 2], *args, **kwargs)
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", fills_up)
    with pytest.raises(MpsearchError) as err:
        run_batch(BatchConfig.load(cfg), progress=False)
    assert "\n" not in str(err.value) and "No space left on device" in str(err.value)
    assert "finished cells are kept" in str(err.value) and str(writes[-1]) in str(err.value)
    cells = tmp_path / "run" / "cells"
    done = sorted(cells.glob("*/metrics.json"))
    assert len(done) == 1 and not list(cells.glob("*/.*.tmp"))  # the finished cell kept, no half-written file
    stamp = done[0].stat().st_mtime_ns
    monkeypatch.setattr(Path, "write_text", real)
    results = run_batch(BatchConfig.load(cfg), progress=False)  # space again: the re-run finishes the grid
    assert len(results) == 2 and set(results["status"]) == {"optimal"}
    assert done[0].stat().st_mtime_ns == stamp  # not redone


def test_a_grid_with_the_evolutionary_solver_measures_its_plans_and_finishes(tmp_path):
    # an evolutionary cell used to end the grid in a bare TypeError (no fitness) after the other cells: the
    # resolved search gives it a PlanFitness on the calibration data, and its study lives in the run dir
    from mpsearch.batch import run_batch

    cfg = tmp_path / "grid.toml"
    run = tmp_path / "run"
    cfg.write_text(
        f'run_dir = "{run}"\nmodels = ["digits-cnn"]\nestimators = ["sqnr"]\nsolvers = ["dp", "evolutionary"]\n'
        'budgets = [{avg_bits = 4.0}]\noptions = ["int2", "int4", "int8"]\n'
    )
    results = run_batch(BatchConfig.load(cfg), progress=False).set_index("solver")
    assert set(results.index) == {"dp", "evolutionary"} and (results["avg_bits"] <= 4.0 + 1e-9).all()
    assert results.loc["evolutionary", "status"] == "feasible" and list((run / "evolutionary").glob("*.db"))


def test_a_rerun_with_other_options_estimates_anew(tmp_path):
    # run-dir tables were keyed by model and estimator only: a re-run with other options reused the old table
    from mpsearch.batch import run_batch

    cfg = tmp_path / "grid.toml"
    grid = f'run_dir = "{tmp_path / "run"}"\nmodels = ["digits-cnn"]\nestimators = ["sqnr"]\nsolvers = ["dp"]\n'
    cfg.write_text(grid + 'budgets = [{avg_bits = 6.0}]\noptions = ["int4", "int8"]\n')
    run_batch(BatchConfig.load(cfg), progress=False)
    cfg.write_text(grid + 'budgets = [{avg_bits = 3.0}]\noptions = ["int2", "int3"]\n')
    results = run_batch(BatchConfig.load(cfg), progress=False).set_index("budget_value")
    assert results.loc[3.0, "status"] == "optimal" and results.loc[3.0, "avg_bits"] <= 3.0
    assert len(list((tmp_path / "run" / "tables").glob("digits-cnn__sqnr__*.parquet"))) == 2


def test_your_own_model_in_a_grid_loaded_once_tables_shared_across_budgets(tmp_path, llama_dir, text, monkeypatch):
    from mpsearch import batch

    loads = []
    real = batch.ModelEntry.load
    monkeypatch.setattr(batch.ModelEntry, "load", lambda self: loads.append(self.name) or real(self))
    cfg = tmp_path / "grid.toml"
    cfg.write_text(
        f'run_dir = "{tmp_path / "run"}"\nestimators = ["sqnr"]\nsolvers = ["dp", "greedy"]\n'
        'budgets = [{avg_bits = 6.0}, {avg_bits = 8.0}]\noptions = ["int4_g32_asym", "int8"]\n'
        f'[[models]]\npath = "{llama_dir}"\ncalib = "{text}"\nname = "mine"\nseq_len = 64\nn_calib = 4\n'
        "n_eval = 2\nbatch_size = 2\n"
    )
    results = batch.run_batch(BatchConfig.load(cfg), progress=False)
    assert loads == ["mine"] and len(results) == 4 and set(results["model"]) == {"mine"}
    assert (results["metric_name"] == "perplexity").all() and (results["avg_bits"] <= results["budget_value"]).all()
    assert len(list((tmp_path / "run" / "tables").glob("mine__sqnr__*.parquet"))) == 1
    # other text is other calibration data: a table of its own, not the one built on the first text
    other = tmp_path / "other.txt"
    other.write_text(text.read_text()[::-1])
    cfg.write_text(cfg.read_text().replace(str(text), str(other)).replace("{avg_bits = 8.0}", "{avg_bits = 7.0}"))
    batch.run_batch(BatchConfig.load(cfg), progress=False)
    assert len(list((tmp_path / "run" / "tables").glob("mine__sqnr__*.parquet"))) == 2


def test_bad_model_entries_are_listed_before_any_cell(tmp_path, llama_dir, text, capsys):
    bad = f"""
run_dir = "{tmp_path / "r"}"
estimators = ["sqnr"]
solvers = ["dp"]
budgets = [{{avg_bits = 6.0}}]
models = [
  {{path = "{tmp_path / "nothing-here.gguf"}", calib = "{text}"}},
  {{path = "{llama_dir}"}},
  {{path = "{llama_dir}", calib = "{tmp_path / "no.txt"}", seq_len = 0, name = "a/b"}},
  {{path = "{llama_dir}", calib = "{text}", colour = "red"}},
]
"""
    (tmp_path / "bad.toml").write_text(bad)
    code = main(["batch", str(tmp_path / "bad.toml")])
    err = capsys.readouterr().err
    for line in (
        "nothing-here.gguf does not exist",
        "needs calib = ",
        "--seq-len 0 must be a whole number >= 1",
        f"calib file {tmp_path / 'no.txt'} does not exist",
        "model name 'a/b' must be letters",
        "model entry key 'colour' is unknown",
    ):
        assert line in err, line
    assert code == 2 and not (tmp_path / "r").exists()


def test_two_model_entries_with_one_name_are_refused(tmp_path, llama_dir, text):
    from mpsearch.core import MpsearchError

    entry = f'{{path = "{llama_dir}", calib = "{text}"}}'
    (tmp_path / "twice.toml").write_text(
        f'estimators = ["sqnr"]\nsolvers = ["dp"]\nbudgets = [{{avg_bits = 6.0}}]\nmodels = [{entry}, {entry}]\n'
    )
    with pytest.raises(MpsearchError, match=f"model name '{llama_dir.name}' appears twice"):
        BatchConfig.load(tmp_path / "twice.toml")
