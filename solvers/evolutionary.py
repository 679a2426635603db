"""Evolutionary search on the real model (EvoPress-style), built on Optuna.

The fitness of a plan is a caller-supplied function (for mpsearch: the quantized model's loss on calibration
data, see ``mpsearch.fitness``), so damage need not be additive. The search starts from a warm-start plan
(the exact optimum on the table, by CoreDP unless told otherwise), which is always the first trial: the
result is never worse than its start.
Each new candidate is a mutation of a good earlier trial: a few units move one option up or down, then the
plan is repaired to meet the budget by the cheapest (table-damage) downgrades.

The study lives in an Optuna storage: SQLite in the run directory by default (an interrupted search resumes
where it stopped), or any Optuna RDB URL (PostgreSQL...) so that several worker processes share one search.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from mpsearch.core import BitPlan, MpsearchError
from mpsearch.core.errors import redact
from mpsearch.core.params import Interval, OneOf
from solvers.base import Solver
from solvers.problem import SOLVER_RTOL, Problem

Fitness = Callable[[BitPlan], float]


def _make_sampler(problem: Problem, start: np.ndarray, seed: int, n_mutations: int, tournament: int):
    import optuna
    from optuna.distributions import CategoricalDistribution

    # options of each unit ordered by the first constraint's cost, so "one step" means one size step
    order = [np.argsort(problem.costs[0][u, : len(o)]) for u, o in enumerate(problem.unit_options)]
    rank = [np.argsort(o) for o in order]

    class EvoSampler(optuna.samplers.BaseSampler):
        """Relative sampler: mutation of a tournament-selected completed trial, repaired to the budget."""

        def infer_relative_search_space(self, study, trial):
            return {f"u{u}": CategoricalDistribution(list(range(len(o)))) for u, o in enumerate(problem.unit_options)}

        def sample_relative(self, study, trial, search_space):
            done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
            if not done:
                return {f"u{u}": int(k) for u, k in enumerate(start)}
            rng = np.random.default_rng([seed, trial.number])
            pool = sorted(done, key=lambda t: t.value)[: max(1, tournament)]
            parent = pool[rng.integers(len(pool))]
            choice = np.array([parent.params[f"u{u}"] for u in range(problem.n_units)])
            for u in rng.choice(problem.n_units, size=min(n_mutations, problem.n_units), replace=False):
                pos = int(rank[u][choice[u]]) + int(rng.choice([-1, 1]))
                choice[u] = order[u][int(np.clip(pos, 0, len(order[u]) - 1))]
            return {f"u{u}": int(k) for u, k in enumerate(_repair(problem, choice, order, rank))}

        def sample_independent(self, study, trial, param_name, param_distribution):
            raise RuntimeError(f"EvoSampler samples every parameter jointly; unexpected {param_name}")

    return EvoSampler()


def _repair(problem: Problem, choice: np.ndarray, order, rank) -> np.ndarray:
    """Step units down (least table damage increase per saved cost first) until every constraint holds."""
    choice = choice.copy()
    limits = problem.limits()
    while True:
        _, totals = problem.evaluate(choice)
        over = totals > limits * (1 + SOLVER_RTOL)
        if not over.any():
            return choice
        best, best_ratio = None, np.inf
        for u in range(problem.n_units):
            pos = int(rank[u][choice[u]])
            if pos == 0:
                continue
            k = order[u][pos - 1]
            saved = sum((c[u, choice[u]] - c[u, k]) / limits[j] for j, c in enumerate(problem.costs) if over[j])
            if saved <= 0:
                continue
            ratio = max(problem.damage[u, k] - problem.damage[u, choice[u]], 0) / saved
            if ratio < best_ratio:
                best, best_ratio = (u, k), ratio
        if best is None:
            raise MpsearchError("a mutated plan cannot be repaired to the budget", "check the budget")
        choice[best[0]] = best[1]


def _open_study(name: str, storage: str, sampler):
    """Create or load the study. Workers starting together race to create the schema and the study in an
    empty database; the loser of that race simply tries again (the winner's schema is then there)."""
    import optuna
    import sqlalchemy.exc

    for attempt in range(5):
        try:
            return optuna.create_study(study_name=name, storage=storage, sampler=sampler, load_if_exists=True)
        except (sqlalchemy.exc.DBAPIError, optuna.exceptions.DuplicatedStudyError) as err:
            # PostgreSQL reports a lost schema race as IntegrityError (a row) or ProgrammingError
            # (DuplicateObject/DuplicateTable: 'type "studydirection" already exists'); anything else is real.
            lost_race = isinstance(err, (sqlalchemy.exc.IntegrityError, optuna.exceptions.DuplicatedStudyError))
            if attempt == 4 or not (lost_race or "already exists" in str(err)):
                raise
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


class Evolutionary(Solver):
    """Evolutionary search whose fitness is measured on the real model.

    ``fitness(plan) -> float`` (lower is better); ``n_trials`` trials in this call (the study may hold more
    from earlier runs or other workers); ``timeout`` seconds at most; ``warm_start`` a solver name ("core",
    "ilp") whose optimum seeds the search; ``storage`` an Optuna storage URL (default: SQLite file
    ``run_dir/evolutionary.db``; ":memory:" keeps it in this process only); ``study_name``: a study to share
    with other workers (always joined); without one, ``resume=True`` continues the study derived from the
    table, budget and seed, and ``resume=False`` (default) starts a fresh one beside it (nothing is deleted).
    ``extra["study"]`` says which: "fresh", "resumed (N earlier trials)" or "shared".
    """

    name = "evolutionary"
    _parameter_constraints = {
        "fitness": ["callable"],
        "n_trials": [Interval(int, 1)],
        "timeout": [None, Interval(float, 0, open_low=True)],
        "warm_start": [OneOf(("core", "dp", "ilp", "greedy", "bruteforce"))],
        "storage": [None, str],
        "run_dir": [str, Path],
        "study_name": [None, str],
        "n_mutations": [Interval(int, 1)],
        "tournament": [Interval(int, 1)],
        "seed": [Interval(int, 0)],
        "progress": [bool],
        "resume": [bool],
    }

    def __init__(
        self,
        fitness: Fitness,
        n_trials: int = 100,
        timeout: float | None = None,
        warm_start: str = "core",
        storage: str | None = None,
        run_dir: str = "runs/evolutionary",
        study_name: str | None = None,
        n_mutations: int = 2,
        tournament: int = 4,
        seed: int = 0,
        progress: bool = False,
        resume: bool = False,
    ) -> None:
        self.fitness = fitness
        self.n_trials = n_trials
        self.timeout = timeout
        self.warm_start = warm_start
        self.storage = storage
        self.run_dir = run_dir
        self.study_name = study_name
        self.n_mutations = n_mutations
        self.tournament = tournament
        self.seed = seed
        self.progress = progress
        self.resume = resume

    def get_params(self) -> dict:
        """Parameters as recorded in a plan's provenance: no fitness, the storage URL without its password."""
        params = {k: v for k, v in super().get_params().items() if k != "fitness"}
        if isinstance(params.get("storage"), str):
            params["storage"] = redact(params["storage"])
        return params

    def study_name_for(self, problem: Problem) -> str:
        """The study this run joins: ``study_name``, else the one derived from the table, budget and seed."""
        if self.study_name:
            return self.study_name
        key = json.dumps([problem.table.fingerprint(), problem.budget.to_dict(), self.seed], sort_keys=True)
        return "mpsearch-" + hashlib.sha256(key.encode()).hexdigest()[:16]

    def _fresh_name(self, base: str, storage: str | None) -> str:
        """``base`` if no study of that name exists yet, else ``base-2``, ``base-3``, ...: a new study."""
        import optuna

        existing = {s.study_name for s in optuna.get_all_study_summaries(storage)} if storage else set()
        name, k = base, 1
        while name in existing:
            k += 1
            name = f"{base}-{k}"
        return name

    def _solve(self, problem: Problem):
        import optuna

        from solvers import get_solver

        start = get_solver(self.warm_start).solve(problem)
        start_choice = problem.choice_of(start.plan)
        storage = self.storage
        if storage is None:
            Path(self.run_dir).mkdir(parents=True, exist_ok=True)
            storage = f"sqlite:///{Path(self.run_dir) / 'evolutionary.db'}"
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        sampler = _make_sampler(problem, start_choice, self.seed, self.n_mutations, self.tournament)
        url = None if storage == ":memory:" else storage
        try:
            name = self.study_name_for(problem)
            if not self.study_name and not self.resume:
                name = self._fresh_name(name, url)
            study = _open_study(name, url, sampler)
        except Exception as err:  # sqlalchemy/driver errors: name the storage, never its password
            if isinstance(err, MpsearchError):
                raise
            raise MpsearchError(
                f"cannot open the Optuna storage {redact(storage)} ({type(err).__name__}: "
                f"{redact(str(err)).splitlines()[0] if str(err) else 'no detail'})",
                "check the storage URL, that its server runs and that its driver is installed",
            ) from None

        def objective(trial):
            choice = np.array(
                [trial.suggest_categorical(f"u{u}", list(range(len(o)))) for u, o in enumerate(problem.unit_options)]
            )
            plan = problem.result(choice, "feasible", self.name, {}, 0.0).plan
            return float(self.fitness(plan))

        earlier = len(study.trials)
        kind = "shared" if self.study_name else f"resumed ({earlier} earlier trials)" if earlier else "fresh"
        study.optimize(objective, n_trials=self.n_trials, timeout=self.timeout, show_progress_bar=self.progress)
        best = study.best_trial
        first = min(study.trials, key=lambda t: t.number)
        self.extra_ = {
            "fitness": best.value,
            "start_fitness": first.value,
            "n_trials_total": len(study.trials),
            "study_name": study.study_name,
            "storage": redact(storage),
            "study": kind,
        }
        return np.array([best.params[f"u{u}"] for u in range(problem.n_units)]), "feasible", float("nan")
