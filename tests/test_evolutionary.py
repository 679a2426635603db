"""Evolutionary search on the real digits-cnn: warm start, never worse, resumable SQLite study, and two worker
processes sharing one PostgreSQL study."""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import optuna
import pytest

from mpsearch import Budget, estimate
from mpsearch.fitness import PlanFitness
from solvers import DP, Evolutionary, Problem

HERE = Path(__file__).parent
PER_CHANNEL = ["int3", "int4", "int5", "int6", "int8"]


@pytest.fixture(scope="module")
def setup(digits):
    table = estimate(
        digits.model, digits.calibration, "sqnr", PER_CHANNEL, loss_fn="kl", estimator_params={"progress": False}
    )
    fitness = PlanFitness(digits.model, digits.calibration, "kl")
    return table, fitness


def test_fitness_is_the_real_loss_of_the_quantized_model(digits, setup):
    import mpsearch

    table, fitness = setup
    plan = DP().solve(Problem(table, Budget(avg_bits=4.0))).plan
    measured = mpsearch.evaluate(digits.model, plan, digits.calibration, "kl")
    assert fitness(plan) == pytest.approx(measured["loss"], rel=1e-5)


def test_warm_started_never_worse_and_resumes(tmp_path, setup):
    table, fitness = setup
    problem = Problem(table, Budget(avg_bits=4.0))
    start = DP().solve(problem).plan
    evo = Evolutionary(fitness, n_trials=12, run_dir=str(tmp_path), seed=1)
    result = evo.solve(problem)
    assert result.extra["start_fitness"] == pytest.approx(fitness(start))
    assert result.extra["fitness"] <= result.extra["start_fitness"]
    assert result.constraints["avg_bits"].slack >= 0
    assert (tmp_path / "evolutionary.db").exists()
    assert result.extra["study"] == "fresh"
    again = Evolutionary(fitness, n_trials=5, run_dir=str(tmp_path), seed=1, resume=True).solve(problem)
    assert again.extra["n_trials_total"] == 17 and again.extra["study"] == "resumed (12 earlier trials)"
    assert again.extra["fitness"] <= result.extra["fitness"]
    fresh = Evolutionary(fitness, n_trials=3, run_dir=str(tmp_path), seed=1).solve(problem)  # the default
    assert fresh.extra["study"] == "fresh" and fresh.extra["n_trials_total"] == 3
    assert fresh.extra["study_name"] == result.extra["study_name"] + "-2"  # beside it: nothing deleted
    # every trial's plan meets the budget
    study = optuna.load_study(study_name=result.extra["study_name"], storage=result.extra["storage"])
    for trial in study.trials:
        choice = [trial.params[f"u{u}"] for u in range(problem.n_units)]
        assert problem.is_feasible(__import__("numpy").array(choice))


def test_two_constraint_budget_warm_starts_from_the_exact_optimum(tmp_path, setup):
    # the warm start used to be DP, which refuses two constraints
    from solvers import CoreDP

    table, fitness = setup
    size = (table.uniform_cost("int3", "size_bytes") + table.uniform_cost("int6", "size_bytes")) / 2
    bops = (table.uniform_cost("int3", "bops") + table.uniform_cost("int6", "bops")) / 2
    problem = Problem(table, Budget(size_bytes=size, bops=bops))
    result = Evolutionary(fitness, n_trials=4, run_dir=str(tmp_path), seed=0).solve(problem)
    assert result.extra["start_fitness"] == pytest.approx(fitness(CoreDP().solve(problem).plan))
    assert result.extra["fitness"] <= result.extra["start_fitness"]
    assert all(c.slack >= 0 for c in result.constraints.values())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def postgres():
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if not (initdb and pg_ctl):
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL binaries missing: .ci/run installs the postgresql package")
        pytest.skip("PostgreSQL is not installed")
    # a directory the server's user can reach (pytest's tmp_path parent is private to root)
    tmp_path = Path(tempfile.mkdtemp(prefix="mpsearch-pg-"))
    data, port = tmp_path / "pg", _free_port()
    env = {**os.environ}
    run_as = [] if os.geteuid() != 0 else ["runuser", "-u", "postgres", "--"]  # initdb refuses root
    if run_as:
        shutil.chown(tmp_path, "postgres")
    subprocess.run(
        [*run_as, initdb, "-D", str(data), "-U", "mpsearch", "--auth=trust"], check=True, capture_output=True, env=env
    )
    subprocess.run(
        [
            *run_as,
            pg_ctl,
            "-D",
            str(data),
            "-o",
            f"-p {port} -k {tmp_path} -c listen_addresses=127.0.0.1",
            "-l",
            str(tmp_path / "pg.log"),
            "-w",
            "start",
        ],
        check=True,
        capture_output=True,
        env=env,
    )
    try:
        subprocess.run(["createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "mpsearch", "optuna"], check=True)
        yield f"postgresql://mpsearch@127.0.0.1:{port}/optuna"
    finally:
        subprocess.run([*run_as, pg_ctl, "-D", str(data), "-m", "fast", "stop"], capture_output=True)
        shutil.rmtree(tmp_path, ignore_errors=True)


def test_two_workers_share_one_postgres_study(postgres):
    procs = [
        subprocess.Popen(
            [sys.executable, str(HERE / "helpers" / "evo_worker.py"), postgres, str(w), "8"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for w in (1, 2)
    ]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    assert all(o["calls"] >= 8 for o in outs)  # both workers contributed trials
    study = optuna.load_study(study_name="shared", storage=postgres)
    assert len([t for t in study.trials if t.state.is_finished()]) == 16
    best = min(t.value for t in study.trials if t.value is not None)
    assert study.best_value == best
    # the worker that finished last saw every trial; its result is the best over both
    assert min(o["fitness"] for o in outs) == pytest.approx(best)


def test_open_study_retries_a_lost_schema_race_and_nothing_else(monkeypatch):
    """Workers starting together on an empty PostgreSQL race to create Optuna's schema; the loser sees
    ProgrammingError 'type ... already exists' and must retry, while any other database error is raised."""
    import sqlalchemy.exc

    from solvers import evolutionary

    real = optuna.create_study
    calls = []

    def racing(**kw):
        calls.append(kw["study_name"])
        if len(calls) == 1:
            raise sqlalchemy.exc.ProgrammingError("CREATE TYPE", {}, Exception('type "studydirection" already exists'))
        return real(**kw)

    monkeypatch.setattr(optuna, "create_study", racing)
    monkeypatch.setattr(evolutionary.time, "sleep", lambda s: None)
    study = evolutionary._open_study("s", None, optuna.samplers.RandomSampler(seed=0))
    assert study.study_name == "s" and len(calls) == 2

    def broken(**kw):
        calls.append(kw["study_name"])
        raise sqlalchemy.exc.ProgrammingError("SELECT", {}, Exception('relation "studies" does not exist'))

    calls.clear()
    monkeypatch.setattr(optuna, "create_study", broken)
    with pytest.raises(sqlalchemy.exc.ProgrammingError):
        evolutionary._open_study("s", None, optuna.samplers.RandomSampler(seed=0))
    assert len(calls) == 1
