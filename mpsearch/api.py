"""The Python API: search, estimate, solve, pareto, evaluate.

Estimator and solver parameters travel in ``estimator_params={...}`` and ``solver_params={...}``; both are
validated (names and values) before any model copy or forward pass.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from contextlib import nullcontext

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from mpsearch.context import (  # noqa: F401 (check_budget, check_refine, make_*: part of the API)
    REFINE,
    SearchContext,
    check_budget,
    check_refine,
    make_estimator,
    make_solver,
    search_components,
)
from mpsearch.core import (
    BitPlan,
    Budget,
    CostTable,
    MpsearchError,
    SearchResult,
    parse_option,
)
from mpsearch.data import as_batches
from mpsearch.layers import discover, require_finite
from mpsearch.names import DEFAULT_ESTIMATOR  # (see mpsearch.names)
from mpsearch.outputs import OutputFn, evaluating, metric_of, nll_sum, raw_call, reduce_output, resolve_objective
from mpsearch.quant.apply import quantized_weights, resolve_plan, swapped
from mpsearch.quant.quantizer import for_plan
from mpsearch.runtimes.inputs import rounded_inputs


def _no_extra(function: str, extra: dict) -> None:
    if extra:
        raise MpsearchError(
            f"{function}() has no parameter {', '.join(map(repr, sorted(extra)))}",
            "estimator parameters go in estimator_params={...}, solver parameters in solver_params={...}",
        )


def estimate(
    model: nn.Module | str,
    data: Iterable | None = None,
    estimator=DEFAULT_ESTIMATOR,
    options: Iterable[str] | None = None,
    loss_fn=None,
    *,
    output_fn: OutputFn | None = None,
    include=None,
    exclude=None,
    estimator_params: dict | None = None,
    cache: bool = True,
    device: str | None = None,
    target: str | None = None,
    quantizer="rtn",
    tokenizer=None,
    **extra,
) -> CostTable:
    """Build a cost table with an estimator (a name from sensitivity.REGISTRY or an Estimator).

    ``model``: an nn.Module (any transformers model as it comes; ``data`` required) or a zoo name.
    ``loss_fn``: None (KL for logits, cosine for embeddings), "kl", "cosine" or f(output, reference);
    ``output_fn(output, batch)``: overrides the output convention; ``include``/``exclude``: FQN patterns;
    ``cache``: reuse/store the table in the on-disk cache; ``device``: where a zoo model is loaded (default:
    CUDA when available); a module runs where it lives; ``target``: a runtime of ``mpsearch.runtimes.RUNTIMES``
    whose options (sizes and quantization math its own) are estimated; ``quantizer``: "rtn" (round to
    nearest), "gptq" (GPTQ with Hessians from ``data``, cached under its spec; see mpsearch.quant.gptq) or a
    ``mpsearch.quant.quantizer.Quantizer``; ``tokenizer``: turns ``data`` given as a list of strings into
    batches (a transformers tokenizer, or a callable such as ``SentenceTransformer.tokenize``).
    """
    _no_extra("estimate", extra)
    ctx = SearchContext.resolve(
        model, data, None, estimator, None, options, loss_fn, output_fn=output_fn, include=include,
        exclude=exclude, estimator_params=estimator_params, device=device, target=target, safe=False,
        quantizer=quantizer, cache=cache, tokenizer=tokenizer,
    )  # fmt: skip
    return ctx.estimate()


def solve(table: CostTable, budget: Budget, solver="core", solver_params: dict | None = None) -> SearchResult:
    """Solve a cost table under a budget (a name from solvers.REGISTRY or a Solver).

    "evolutionary" also needs ``solver_params={"fitness": ...}`` (e.g. ``mpsearch.fitness.PlanFitness``).
    """
    import solvers

    return make_solver(solver, solver_params).solve(solvers.Problem(table, budget))


def search(
    model: nn.Module | str,
    data: Iterable | None = None,
    budget: Budget | None = None,
    estimator=DEFAULT_ESTIMATOR,
    solver="core",
    options: Iterable[str] | None = None,
    loss_fn=None,
    *,
    output_fn: OutputFn | None = None,
    include=None,
    exclude=None,
    estimator_params: dict | None = None,
    solver_params: dict | None = None,
    device: str | None = None,
    target: str | None = None,
    safe: bool = True,
    refine: int = REFINE,
    quantizer="rtn",
    cache: bool = True,
    tokenizer=None,
    **extra,
) -> SearchResult:
    """Estimate sensitivities and solve for the best plan under ``budget`` (default: avg 4 bits).

    ``model``: an nn.Module (then ``data`` is required; it runs where it lives) or a zoo name such as
    ``"smollm2-135m"`` (loaded onto ``device``, default CUDA when available).
    Parameters are checked before any work: ``estimator_params`` go to the estimator, ``solver_params`` to
    the solver; "evolutionary" gets a PlanFitness on ``data`` unless ``solver_params`` has ``fitness``.
    ``target``: the runtime the plan is for (``mpsearch.runtimes.RUNTIMES``): its options, sizes and math.
    ``safe`` (default): a quarter of the calibration data is held out of the estimate; on it the plan is
    refined by up to ``refine`` measured moves and compared with every uniform option within the budget,
    and the best measured plan is returned (``result.extra["safety"]`` has the losses; see mpsearch.safety).
    ``quantizer``: "rtn" (round to nearest), "gptq" (GPTQ with the Hessians of the calibration data's fit split)
    or a Quantizer: the table and the check use it, and the plan's provenance records its ``spec()``, so that
    ``apply_plan``, ``quantized`` and ``evaluate`` rebuild exactly that math (or refuse); ``cache``: reuse/store
    the table and the quantizer's state on disk. ``result.extra``: the cost table (``"table"``), the quantizer
    searched with (``"quantizer"``: pass it to ``evaluate``), the seconds of each stage (``"stages_s"``).
    ``tokenizer``: turns ``data`` given as a list of strings into batches (see ``estimate``).
    """
    _no_extra("search", extra)
    ctx = SearchContext.resolve(
        model, data, budget or Budget(avg_bits=4.0), estimator, solver, options, loss_fn, output_fn=output_fn,
        include=include, exclude=exclude, estimator_params=estimator_params, solver_params=solver_params,
        device=device, target=target, safe=safe, refine=refine, quantizer=quantizer, cache=cache,
        tokenizer=tokenizer,
    )  # fmt: skip
    return ctx.run()


def pareto(
    model: nn.Module | str,
    data: Iterable | None = None,
    estimator=DEFAULT_ESTIMATOR,
    options: Iterable[str] | None = None,
    axis: str = "size_bytes",
    loss_fn=None,
    table: CostTable | None = None,
    budgets: int | None = None,
    *,
    output_fn: OutputFn | None = None,
    include=None,
    exclude=None,
    estimator_params: dict | None = None,
    target: str | None = None,
    **extra,
):
    """The exact predicted-damage vs ``axis`` ("size_bytes" or "avg_bits") front of a model's table, from the
    smallest plan up to the largest option everywhere. Returns a ParetoFront (``to_frame``, ``plot``,
    ``plan_at``); ``front.meta["uniform"]`` holds each uniform option's (cost, predicted damage).
    ``budgets=N`` lists only the optima at N evenly spaced budgets plus the hull vertices (for tables with
    thousands of layers, whose complete front is huge; see ``solvers.Pareto``)."""
    import solvers

    _no_extra("pareto", extra)
    if axis not in ("size_bytes", "avg_bits"):
        raise MpsearchError(f"unknown front axis {axis!r}", "use 'size_bytes' or 'avg_bits'")
    front_solver = solvers.Pareto(budgets=budgets)
    front_solver.validate_params()
    if table is None:
        table = estimate(
            model,
            data,
            estimator,
            options,
            loss_fn,
            output_fn=output_fn,
            include=include,
            exclude=exclude,
            estimator_params=estimator_params,
            target=target,
        )
    uniform = table.uniform_options()
    costs = {o: table.uniform_cost(o, "bits" if axis == "avg_bits" else axis) for o in uniform}
    frame = table.frame.assign(stored_bits=table.frame["bits"] * table.frame["n_params"])
    largest = frame.groupby("layer", sort=False)[["size_bytes", "stored_bits"]].max().sum()  # the largest plan
    top = largest["size_bytes"] if axis == "size_bytes" else largest["stored_bits"] / table.total_params()
    budget = Budget(**{axis: float(top)})
    front = front_solver.solve(solvers.Problem(table, budget))
    front.meta["uniform"] = {o: (costs[o], table.uniform_cost(o, "damage")) for o in uniform}
    front.meta["label"] = table.meta.get("estimator", "front")
    return front


def plan_size(model: nn.Module, plan: BitPlan | dict) -> dict:
    """avg effective bits and bytes of the planned weights (scales and zero points included; a shared
    weight counted once)."""
    units = resolve_plan(model, plan)
    bits = sum(parse_option(opt).storage_bits(tuple(u.weight.shape)) for u, opt in units.items())
    n_params = sum(u.weight.numel() for u in units)
    return {"avg_bits": bits / n_params, "size_bytes": int(np.ceil(bits / 8))}


def evaluate(
    model: nn.Module,
    plan: BitPlan | dict,
    data: Iterable,
    loss: str | None = None,
    output_fn: OutputFn | None = None,
    quantizer=None,
    calibration: Iterable | None = None,
    progress: bool = True,
    *,
    uniform: bool | Iterable[str] = True,
    tokenizer=None,
    runtime_inputs: bool | None = None,
) -> dict:
    """Measure ``plan`` against the full-precision model on ``data``, where the model lives, without copying
    it: per batch, one forward with its own weights and one with the plan's quantized weights swapped in
    (``mpsearch.quant.swapped``; the only memory beside the model is the planned weights' quantized values).

    ``loss``: None (decided from the output: "kl" for logits, "cosine" for embeddings), "kl" or "cosine".
    Metric: ``perplexity`` on the data for causal LMs (lower is better; ``perplexity_fp`` beside it), else
    ``neg_kl`` = -KL or ``cosine`` = mean cosine similarity (higher is better). Returns avg_bits,
    size_bytes, metric_name, metric, higher_is_better, loss_name, loss.
    ``quantizer``: None (the plan's own, from its provenance's spec: see ``mpsearch.quant.quantizer.for_plan``),
    a name or a Quantizer (refused when it differs from the plan's spec); a GPTQ plan is rebuilt exactly from
    ``calibration`` (the data given to search; never ``data``: the evaluation stays held out) or the cache,
    or refused. ``progress``: a progress bar over the batches.
    ``uniform``: also measure the fair baseline, the best uniform option of no larger size (``best_uniform``), among
    the options the plan was searched over (True: those its provenance records; or a list of option names;
    False: none); a uniform plan is its own baseline. The result then has ``uniform_option``,
    ``uniform_avg_bits`` and ``uniform_metric`` (None each when no option fits the size).
    ``tokenizer``: turns ``data`` given as a list of strings into batches (``mpsearch.data.as_batches``).
    ``runtime_inputs``: also round each planned layer's input as its runtime rounds it before a quantized
    matmul (llama.cpp's CPU backend: ``mpsearch.runtimes.llama_cpp_inputs``), so the ratio to full precision is
    the one llama-perplexity measures; None (default): as the plan was searched (provenance ``runtime_inputs``:
    whether its table counted that rounding; False for a plan without one).
    """
    batches = as_batches(data, tokenizer)
    plan = plan if isinstance(plan, BitPlan) else BitPlan(plan)
    runtime_inputs = searched_inputs(plan, runtime_inputs)
    q = for_plan(model, plan, quantizer, calibration, "evaluate")
    result = _measure(model, plan, batches, loss, output_fn, q, progress, runtime_inputs)
    names = plan.provenance.get("options") if uniform is True else uniform
    if names and len(set(plan.assignments.values())) > 1:
        option, best = best_uniform(
            model, plan, batches, list(names), loss, output_fn, quantizer=q, size=result["avg_bits"],
            runtime_inputs=runtime_inputs,
        )  # fmt: skip
        result.update(
            uniform_option=option,
            uniform_avg_bits=best["avg_bits"] if best else None,
            uniform_metric=best["metric"] if best else None,
        )
    return result


def searched_inputs(plan: BitPlan, runtime_inputs: bool | None) -> bool:
    """``runtime_inputs`` as given, or (None) as ``plan`` was searched."""
    return bool(plan.provenance.get("runtime_inputs", False)) if runtime_inputs is None else runtime_inputs


def _measure(model, plan, batches: list, loss, output_fn, q, progress: bool, runtime_inputs: bool = False) -> dict:
    """``evaluate`` of one plan with quantizer ``q`` (see there)."""
    plan = plan if isinstance(plan, BitPlan) else BitPlan(plan)
    if loss is not None and loss not in ("kl", "cosine"):
        raise MpsearchError(f"unknown loss {loss!r}", "use 'kl' or 'cosine'")
    sizes = plan_size(model, plan)
    require_finite(list(resolve_plan(model, plan)))
    losses, nll = [], {"fp": [0.0, 0], "q": [0.0, 0]}
    with evaluating(model), torch.no_grad():
        objective = resolve_objective(loss, output_fn, model, batches[0])
        metric_name, higher = metric_of(model, objective.name, output_fn)
        lm = metric_name == "perplexity"
        q_weights = quantized_weights(model, plan, q)
        bar = tqdm(batches, desc="evaluate", disable=not progress or len(batches) < 2, leave=False)
        for batch in bar:  # one forward of each model per batch serves the loss and the perplexity
            raw = {"fp": raw_call(model, batch)}
            with swapped(model, q_weights), rounded_inputs(model, plan) if runtime_inputs else nullcontext():
                raw["q"] = raw_call(model, batch)
            ref, out = (reduce_output(raw[k], batch, output_fn) for k in ("fp", "q"))
            losses.append(float(objective.loss(out, ref)))
            for key in nll if lm else ():
                total, count = nll_sum(raw[key], batch)
                nll[key][0] += total
                nll[key][1] += count
    value = float(np.mean(losses))
    if not math.isfinite(value):
        raise MpsearchError(
            f"the planned model's {objective.name} is {value} on this data (the full-precision outputs or the "
            "quantized ones hold NaN or inf)",
            "check the model's outputs on this data in full precision first",
        )
    result = {**sizes, "loss_name": objective.name, "loss": value}
    if lm:
        ppl = {k: math.exp(total / max(count, 1)) for k, (total, count) in nll.items()}
        result.update(perplexity=ppl["q"], perplexity_fp=ppl["fp"])
        metric = ppl["q"]
    else:
        metric = -value if metric_name == "neg_kl" else 1.0 - value
    return {**result, "metric_name": metric_name, "metric": metric, "higher_is_better": higher}


def best_uniform(
    model: nn.Module,
    plan: BitPlan | dict,
    data: Iterable,
    options: Iterable[str],
    loss: str | None = None,
    output_fn: OutputFn | None = None,
    quantizer=None,
    size: float | None = None,
    status=None,
    runtime_inputs: bool | None = None,
) -> tuple[str | None, dict | None]:
    """(option, its evaluation) of the best uniform plan over ``plan``'s layers among ``options`` whose
    average bits are no larger than the plan's (``size``, when already known), measured with ``quantizer``
    (None: the plan's own) on ``data``; (None, None) when no option can store every layer within that size.
    The fair baseline a mixed plan is compared with. ``status(line)``: told before each measurement;
    ``runtime_inputs``: as ``evaluate``'s."""
    batches = as_batches(data)
    plan = plan if isinstance(plan, BitPlan) else BitPlan(plan)
    runtime_inputs = searched_inputs(plan, runtime_inputs)
    q = for_plan(model, plan, quantizer, None, "evaluate") if quantizer is None else quantizer
    limit = plan_size(model, plan)["avg_bits"] if size is None else size
    units = resolve_plan(model, plan)
    best_option, best = None, None
    for option in options:
        if not all(q.takes(u, parse_option(option)) for u in units):
            continue  # the runtime cannot store every layer in this option: no uniform plan
        candidate = BitPlan({u.name: option for u in units})
        if plan_size(model, candidate)["avg_bits"] <= limit + 1e-12:
            if status is not None:
                status(f"measuring uniform {option} ...")
            result = _measure(model, candidate, batches, loss, output_fn, q, False, runtime_inputs)
            if better(result, best):
                best_option, best = option, result
    return best_option, best


def better(a: dict, b: dict | None) -> bool:
    """Whether evaluation ``a`` is better than ``b`` (None: no contender)."""
    if b is None:
        return True
    return a["metric"] > b["metric"] if a["higher_is_better"] else a["metric"] < b["metric"]


def uniform_plan(model: nn.Module, option: str, include=None, exclude=None) -> BitPlan:
    """Every quantizable unit (a shared weight once) gets ``option``."""
    parse_option(option)
    layers, _ = discover(model, include=include, exclude=exclude)
    return BitPlan({info.name: option for info in layers}, {"uniform": option})
