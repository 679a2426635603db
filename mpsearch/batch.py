"""Offline batch searches: a grid of models x estimators x solvers x budgets into a run directory.

Layout of ``run_dir``:
  tables/<model>__<estimator>__<key>.parquet   one cost table per (model, estimator, options, code), reused
                                         by every solver and budget
  cells/<cell>/plan.json, metrics.json   one folder per finished cell (metrics.json is written last)
  <solver>/                              a solver's own files (the evolutionary study)
  results.parquet, results.csv           every finished cell's metrics, rebuilt at the end
  summary.png                            measured metric vs size per model

Every file is written to a temporary name and renamed, so a crash (even kill -9) leaves only whole files;
re-running the same config skips finished cells and finishes the grid.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import tomllib

from mpsearch.core import Budget, CostTable, InfeasibleBudgetError, MpsearchError
from mpsearch.data import write_atomic

BUDGET_KEYS = ("avg_bits", "size_bytes", "size_fraction")


MODEL_KEYS = ("name", "path", "calib", "eval", "seq_len", "n_calib", "n_eval", "batch_size", "eval_split", "dtype")


@dataclass(frozen=True)
class ModelEntry:
    """One model of the grid: a zoo name, or your own (``{path = "...", calib = "..."}``: a transformers
    folder, a .gguf or module:function, with its text as for the CLI's --calib/--eval)."""

    name: str
    path: str | None = None  # None: a zoo model
    text: object = None  # mpsearch.models.local.TextSpec
    dtype: str = "auto"

    @classmethod
    def of(cls, entry) -> ModelEntry:
        if isinstance(entry, str):
            return cls(entry)
        from mpsearch.models.local import TextSpec

        fields = {k: entry[k] for k in ("seq_len", "n_calib", "n_eval", "batch_size", "eval_split") if k in entry}
        text = TextSpec(entry["calib"], entry.get("eval"), **fields)
        return cls(entry.get("name") or Path(entry["path"]).stem, entry["path"], text, entry.get("dtype", "auto"))

    def load(self):
        from mpsearch.models import load
        from mpsearch.models.local import load_local

        return load(self.name) if self.path is None else load_local(self.path, self.text, self.dtype)


def model_problems(entry) -> list[str]:
    """What is wrong with one ``models`` entry (nothing loaded; files are only looked at)."""
    import re

    from mpsearch.models.local import DTYPES, source_of
    from mpsearch.names import ZOO_NAMES

    if isinstance(entry, str):
        return [] if entry in ZOO_NAMES else [f"unknown model {entry!r} (use one of {', '.join(ZOO_NAMES)}, or a "
                                               '{path = "...", calib = "..."} table for your own)']  # fmt: skip
    if not isinstance(entry, dict):
        return [f"model entry {entry!r} is neither a zoo name nor a table with path and calib"]
    problems = [
        f"model entry key {k!r} is unknown (keys: {', '.join(MODEL_KEYS)})" for k in entry if k not in MODEL_KEYS
    ]
    for key in ("path", "calib"):
        if not isinstance(entry.get(key), str):
            problems.append(f'model entry {entry!r} needs {key} = "..."')
    if problems:
        return problems
    try:
        source_of(entry["path"])
        ModelEntry.of(entry).text.check()
    except MpsearchError as err:
        problems.append(f"model {entry['path']}: {err.what}")
    except TypeError as err:
        problems.append(f"model {entry['path']}: {err}")
    for key in ("calib", "eval"):
        if key in entry and not Path(entry[key]).is_file():
            problems.append(f"model {entry['path']}: {key} file {entry[key]} does not exist")
    if entry.get("dtype", "auto") not in DTYPES:
        problems.append(f"model {entry['path']}: dtype {entry['dtype']!r} is not one of {DTYPES}")
    name = entry.get("name")
    if name is not None and not (isinstance(name, str) and re.fullmatch(r"[\w.-]+", name)):
        problems.append(f"model name {name!r} must be letters, digits, '_', '-' or '.' (it names files)")
    return problems


@dataclass
class BatchConfig:
    run_dir: Path
    models: list[ModelEntry]
    estimators: list[str]
    solvers: list[str]
    budgets: list[dict]
    options: list[str] | None  # None: each model's own default options

    @classmethod
    def load(cls, path: str | Path) -> BatchConfig:
        path = Path(path)
        if not path.is_file():
            raise MpsearchError(
                f"config {path} does not exist", "pass a TOML file such as experiments/configs/memory_grid.toml"
            )
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise MpsearchError(f"config {path} is not valid TOML ({exc})", "fix the file") from None
        problems = grid_problems(raw)
        if problems:  # the whole grid is checked before the first cell: every problem, one line each
            listed = problems[0] if len(problems) == 1 else f"{len(problems)} problems:\n  " + "\n  ".join(problems)
            raise MpsearchError(f"config {path}: {listed}", "fix the config (see experiments/configs/memory_grid.toml)")
        run_dir = Path(raw.get("run_dir", Path("runs") / path.stem))
        return cls(
            run_dir,
            [ModelEntry.of(m) for m in raw["models"]],
            raw["estimators"],
            raw["solvers"],
            raw["budgets"],
            raw.get("options"),
        )


KEYS = ("run_dir", "models", "estimators", "solvers", "budgets", "options")


def grid_problems(raw: dict) -> list[str]:
    """Every problem of a batch config, one line each (empty: the grid can run)."""
    from mpsearch.core import InvalidOptionError, parse_option
    from mpsearch.names import ESTIMATOR_NAMES, SOLVER_NAMES

    problems = [f"unknown key {k!r} (keys: {', '.join(KEYS)})" for k in raw if k not in KEYS]
    known = {"estimators": ESTIMATOR_NAMES, "solvers": SOLVER_NAMES}
    for key in ("models", "estimators", "solvers", "budgets"):
        value = raw.get(key)
        if not isinstance(value, list) or not value:
            problems.append(f"{key} must be a non-empty list, got {value!r}")
            continue
        for item in value if key in known else ():
            if item not in known[key]:
                problems.append(f"unknown {key[:-1]} {item!r} (use one of {', '.join(known[key])})")
        for item in value if key == "models" else ():
            problems.extend(model_problems(item))
        if key == "models" and not any(model_problems(m) for m in value):
            names = [ModelEntry.of(m).name for m in value]
            problems.extend(f"model name {n!r} appears twice (give one a name = ...)" for n in set(names)
                            if names.count(n) > 1)  # fmt: skip
    for b in raw.get("budgets") if isinstance(raw.get("budgets"), list) else ():
        if not isinstance(b, dict) or len(b) != 1 or next(iter(b)) not in BUDGET_KEYS:
            problems.append(f"budget {b!r} is not one of {BUDGET_KEYS}: write e.g. {{avg_bits = 4.0}}")
            continue
        ((key, value),) = b.items()
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            problems.append(f"budget {key} = {value!r} must be a positive number")
    options = raw.get("options")
    if options is not None:
        if not isinstance(options, list) or not options:
            problems.append(f"options must be a non-empty list of option names, got {options!r}")
        else:
            for name in options:
                try:
                    parse_option(name)
                except InvalidOptionError as err:
                    problems.append(err.what)
    run_dir = raw.get("run_dir")
    if run_dir is not None and not isinstance(run_dir, str):
        problems.append(f"run_dir must be a path string, got {run_dir!r}")
    return problems


@contextlib.contextmanager
def _writing(run_dir: Path) -> Iterator[None]:
    """A file-system fault while writing the run (read-only, full disk, a file in the way) is one line naming
    the path; the cells already finished are kept, so a re-run resumes."""
    try:
        yield
    except OSError as err:
        raise MpsearchError(
            f"batch run dir {run_dir}: cannot write {err.filename or run_dir}: {err.strerror or type(err).__name__}",
            "free space or make it writable (or pass --run-dir elsewhere) and re-run: finished cells are kept",
        ) from None


def _open_run_dir(run_dir: Path) -> tuple[Path, Path]:
    """(tables, cells) folders of the run, made if missing; a run dir that is a file is refused at once."""
    if run_dir.exists() and not run_dir.is_dir():
        raise MpsearchError(f"batch run dir {run_dir} is a file, not a directory", "pass --run-dir a folder path")
    tables_dir, cells_dir = run_dir / "tables", run_dir / "cells"
    with _writing(run_dir):
        tables_dir.mkdir(parents=True, exist_ok=True)
        cells_dir.mkdir(parents=True, exist_ok=True)
    return tables_dir, cells_dir


def _solver_params(solver: str, run_dir: Path) -> dict:
    """A solver that keeps files of its own (the evolutionary study) keeps them in the run dir."""
    import solvers

    return {"run_dir": str(run_dir / solver)} if "run_dir" in solvers.REGISTRY[solver].param_names() else {}


def table_name(model: str, estimator: str, options: list[str], data: list | None = None) -> str:
    """A run-dir table's file name, keyed by what a grid can change for one (model, estimator) -- its options and
    its calibration data (your own model's text) -- and by the estimator code (``sensitivity.base._code_hash``),
    so a re-run with other options, text or code estimates anew instead of reusing a table built for others."""
    import hashlib

    from mpsearch.data import data_fingerprint
    from sensitivity.base import _code_hash

    key = [list(options), _code_hash(), data_fingerprint(data) if data is not None else None]
    digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:12]
    return f"{model}__{estimator}__{digest}.parquet"


def _budget(spec: dict, table: CostTable) -> Budget:
    ((key, value),) = spec.items()
    if key == "size_fraction":  # of the all-int8 size (or the largest option's)
        largest = "int8" if "int8" in table.options else table.options[-1]
        return Budget(size_bytes=value * table.uniform_cost(largest, "size_bytes"))
    return Budget(**{key: float(value)})


def cell_id(model: str, estimator: str, solver: str, budget: dict) -> str:
    ((key, value),) = budget.items()
    return f"{model}__{estimator}__{solver}__{key}={value}"


def run_batch(config: BatchConfig, progress: bool = True) -> pd.DataFrame:
    """Run (or resume) the grid; returns the results table."""
    from tqdm.auto import tqdm

    from mpsearch import api
    from mpsearch.context import SearchContext

    tables_dir, cells_dir = _open_run_dir(config.run_dir)
    entries = {m.name: m for m in config.models}
    grid = list(itertools.product(entries, config.estimators, config.solvers, config.budgets))
    todo = [g for g in grid if not (cells_dir / cell_id(*g) / "metrics.json").exists()]
    delay = float(os.environ.get("MPSEARCH_BATCH_CELL_DELAY", "0"))  # test hook: widen the kill window
    zoo_cache: dict = {}
    contexts: dict = {}  # (model, estimator, solver) -> its resolved, validated search
    table_paths: dict = {}  # (model, estimator) -> its run-dir table
    bar = tqdm(
        total=len(grid), initial=len(grid) - len(todo), desc="batch cells", disable=not progress, file=sys.stderr
    )
    for model, estimator, solver, budget_spec in todo:
        if model not in zoo_cache:
            zoo_cache.clear()  # one model in memory at a time
            contexts.clear()
            zoo_cache[model] = entries[model].load()
        zoo = zoo_cache[model]
        if (model, estimator, solver) not in contexts:  # the whole estimate-solve pipeline, validated once
            contexts[model, estimator, solver] = SearchContext.resolve(
                zoo.model, zoo.calibration, None, estimator, solver, config.options or zoo.options, zoo.loss,
                solver_params=_solver_params(solver, config.run_dir), safe=False,
            )  # fmt: skip
        ctx = contexts[model, estimator, solver]
        if (model, estimator) not in table_paths:  # hashing the calibration data once, not once per cell
            table_paths[model, estimator] = tables_dir / table_name(model, estimator, ctx.options, ctx.data)
        table_path = table_paths[model, estimator]
        if table_path.exists():
            table = CostTable.from_parquet(table_path)
        else:
            table = ctx.estimate()
            table.meta["model"] = model
            with _writing(config.run_dir):
                write_atomic(table_path, table.to_parquet)
        start = time.perf_counter()
        cell = cells_dir / cell_id(model, estimator, solver, budget_spec)
        ((key, value),) = budget_spec.items()
        row = {"cell": cell.name, "model": model, "estimator": estimator, "solver": solver}
        row.update(budget_kind=key, budget_value=value)
        try:
            result = ctx.solve(table, _budget(budget_spec, table))
        except InfeasibleBudgetError as err:  # a result too: recorded, and the grid goes on
            with _writing(config.run_dir):
                cell.mkdir(exist_ok=True)
                write_atomic(cell / "metrics.json", json.dumps({**row, "status": "infeasible", "reason": str(err)}))
            bar.update()
            continue
        measured = api.evaluate(zoo.model, result.plan, zoo.evaluation, zoo.loss, progress=False, uniform=False)
        with _writing(config.run_dir):
            cell.mkdir(exist_ok=True)
            write_atomic(cell / "plan.json", result.plan.to_json())
        metrics = {
            **row,
            "status": result.status,
            "predicted_damage": result.objective,
            "avg_bits": measured["avg_bits"],
            "size_bytes": measured["size_bytes"],
            "metric_name": measured["metric_name"],
            "metric": measured["metric"],
            "wall_s": time.perf_counter() - start,
        }
        time.sleep(delay)
        with _writing(config.run_dir):
            write_atomic(cell / "metrics.json", json.dumps(metrics))  # last: marks the cell finished
        bar.update()
    bar.close()
    with _writing(config.run_dir):
        results = collect(config.run_dir)
        _summary_plot(results, config.run_dir / "summary.png")
    return results


def collect(run_dir: Path) -> pd.DataFrame:
    rows = [json.loads(p.read_text()) for p in sorted((run_dir / "cells").glob("*/metrics.json"))]
    results = pd.DataFrame(rows)
    write_atomic(run_dir / "results.parquet", lambda tmp: results.to_parquet(tmp, index=False))
    write_atomic(run_dir / "results.csv", results.to_csv(index=False))
    return results


def _summary_plot(results: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if "status" in results:  # infeasible cells are rows without a plan: nothing to draw
        results = results[results["status"] != "infeasible"]
    if results.empty:
        return
    models = sorted(results["model"].unique())
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        sub = results[results["model"] == model]
        for (est, slv), g in sub.groupby(["estimator", "solver"]):
            g = g.sort_values("size_bytes")
            ax.plot(g["size_bytes"], g["metric"], "o-", label=f"{est}/{slv}")
        ax.set_title(model)
        ax.set_xlabel("size_bytes")
        ax.set_ylabel(sub["metric_name"].iloc[0])
        ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
