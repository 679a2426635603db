"""The Python API: search, estimate, evaluate."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from torch import nn

from mpsearch.core import (
    DEFAULT_OPTIONS,
    BitPlan,
    Budget,
    CostTable,
    MpsearchError,
    SearchResult,
    cost_rows,
    parse_option,
    parse_options,
)
from mpsearch.data import LOSSES, as_batches, outputs
from mpsearch.layers import discover
from mpsearch.quant import apply_plan


def _resolve_model(model, data, loss_fn):
    """A zoo name becomes (module, calibration data, loss name); a module passes through."""
    if isinstance(model, str):
        from mpsearch.models import load

        zoo = load(model)
        return zoo.model, (zoo.calibration if data is None else data), (loss_fn or zoo.loss), model
    if data is None:
        raise MpsearchError("no calibration data given", "pass data= (an iterable of batches)")
    return model, data, loss_fn, None


def estimate(
    model: nn.Module | str,
    data: Iterable | None = None,
    estimator="sqnr",
    options: Iterable[str] = DEFAULT_OPTIONS,
    loss_fn=None,
    **estimator_params,
) -> CostTable:
    """Build a cost table with an estimator (a name from sensitivity.REGISTRY or an Estimator)."""
    import sensitivity

    module, data, loss_fn, name = _resolve_model(model, data, loss_fn)
    est = sensitivity.get_estimator(estimator, **estimator_params) if isinstance(estimator, str) else estimator
    table = est.estimate(module, data, options=options, loss_fn=loss_fn)
    if name:
        table.meta["model"] = name
    return table


def check_budget(model: nn.Module, budget: Budget, options: Iterable[str] = DEFAULT_OPTIONS, example=None) -> None:
    """Raise InfeasibleBudgetError before any estimation if no plan with ``options`` can meet ``budget``."""
    import solvers

    layers, ties = discover(model, example=example)
    frame = cost_rows(layers, parse_options(options)).assign(damage=0.0)
    solvers.Problem(CostTable(frame, {"ties": ties}), budget)


def solve(table: CostTable, budget: Budget, solver="core", **solver_params) -> SearchResult:
    """Solve a cost table under a budget (a name from solvers.REGISTRY or a Solver).

    "evolutionary" also needs ``fitness=`` (e.g. ``mpsearch.fitness.PlanFitness(model, data, loss)``).
    """
    import solvers

    slv = solvers.get_solver(solver, **solver_params) if isinstance(solver, str) else solver
    return slv.solve(solvers.Problem(table, budget))


def search(
    model: nn.Module | str,
    data: Iterable | None = None,
    budget: Budget | None = None,
    estimator="sqnr",
    solver="core",
    options: Iterable[str] = DEFAULT_OPTIONS,
    loss_fn=None,
    **solver_params,
) -> SearchResult:
    """Estimate sensitivities and solve for the best plan under ``budget`` (default: avg 4 bits).

    ``model``: an nn.Module (then ``data`` is required) or a zoo name such as ``"minilm-l6"``.
    ``solver_params`` go to the solver; "evolutionary" gets a PlanFitness on ``data`` unless ``fitness=`` is
    given. The cost table is kept in ``result.extra["table"]``.
    """
    budget = budget or Budget(avg_bits=4.0)
    module, data, loss_fn, name = _resolve_model(model, data, loss_fn)
    data = as_batches(data)  # iterated several times below
    check_budget(module, budget, options, example=data[0] if budget.bops is not None else None)
    table = estimate(module, data, estimator, options, loss_fn)
    if name:
        table.meta["model"] = name
    if solver == "evolutionary" and "fitness" not in solver_params:
        from mpsearch.fitness import PlanFitness

        solver_params["fitness"] = PlanFitness(module, data, loss_fn if isinstance(loss_fn, str) else "kl")
    result = solve(table, budget, solver, **solver_params)
    result.extra["table"] = table
    return result


def pareto(
    model: nn.Module | str,
    data: Iterable | None = None,
    estimator="hessian",
    options: Iterable[str] = DEFAULT_OPTIONS,
    axis: str = "size_bytes",
    loss_fn=None,
    table: CostTable | None = None,
    budgets: int | None = None,
    **estimator_params,
):
    """The exact predicted-damage vs ``axis`` ("size_bytes" or "avg_bits") front of a model's table, from the
    smallest plan up to the largest option everywhere. Returns a ParetoFront (``to_frame``, ``plot``,
    ``plan_at``); ``front.meta["uniform"]`` holds each uniform option's (cost, predicted damage).
    ``budgets=N`` lists only the optima at N evenly spaced budgets plus the hull vertices (for tables with
    thousands of layers, whose complete front is huge; see ``solvers.Pareto``)."""
    import solvers

    if axis not in ("size_bytes", "avg_bits"):
        raise MpsearchError(f"unknown front axis {axis!r}", "use 'size_bytes' or 'avg_bits'")
    if table is None:
        table = estimate(model, data, estimator, options, loss_fn, **estimator_params)
    costs = {o: table.uniform_cost(o, "bits" if axis == "avg_bits" else axis) for o in table.options}
    budget = Budget(**{axis: max(costs.values())})
    front = solvers.Pareto(budgets=budgets).solve(solvers.Problem(table, budget))
    front.meta["uniform"] = {o: (costs[o], table.uniform_cost(o, "damage")) for o in table.options}
    front.meta["label"] = table.meta.get("estimator", "front")
    return front


def plan_size(model: nn.Module, plan: BitPlan | dict) -> dict:
    """avg effective bits and bytes of the planned layers' weights (scales and zero points included)."""
    plan = plan if isinstance(plan, BitPlan) else BitPlan(plan)
    shapes = {info.name: info.shape for info in discover(model)[0]}
    plan.check_layers(list(shapes), require_all=False)
    bits = sum(parse_option(opt).storage_bits(shapes[name]) for name, opt in plan.items())
    n_params = sum(int(np.prod(shapes[name])) for name in plan)
    return {"avg_bits": bits / n_params, "size_bytes": int(np.ceil(bits / 8))}


def evaluate(model: nn.Module, plan: BitPlan | dict, data: Iterable, loss: str = "kl") -> dict:
    """Quantize a copy with ``plan`` and measure it against the full-precision model on ``data``.

    ``loss``: "kl" (logits; metric ``neg_kl`` = -KL, higher is better) or "cosine" (embeddings; metric
    ``cosine`` = mean cosine similarity). Returns avg_bits, size_bytes, metric_name, metric, loss.
    """
    if loss not in LOSSES:
        raise MpsearchError(f"unknown loss {loss!r}", f"use one of {sorted(LOSSES)}")
    batches = as_batches(data)
    quantized = apply_plan(model, plan)
    ref, out = outputs(model, batches), outputs(quantized, batches)
    value = float(np.mean([float(LOSSES[loss](o, r)) for o, r in zip(out, ref)]))
    metric_name, metric = ("neg_kl", -value) if loss == "kl" else ("cosine", 1.0 - value)
    return {**plan_size(model, plan), "metric_name": metric_name, "metric": metric, "loss": value}


def uniform_plan(model: nn.Module, option: str) -> BitPlan:
    """Every quantizable layer gets ``option``."""
    parse_option(option)
    return BitPlan({info.name: option for info in discover(model)[0]}, {"uniform": option})
