"""One resolved, validated search: model, data and its check split, target and options, layers, objective,
quantizer, estimator and solver, resolved once before any work (``SearchContext.resolve``). ``mpsearch.search``
and ``mpsearch.estimate``, the CLI and batch runs are thin layers over it: every name and parameter of every
component (an evolutionary solver's fitness included) is checked here, so a mistake is one line before the
model runs, never a bare ``TypeError`` halfway through."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from torch import nn

from mpsearch.core import (
    DEFAULT_OPTIONS,
    Budget,
    CostTable,
    MpsearchError,
    SearchResult,
    cost_rows,
    parse_option,
    parse_options,
)
from mpsearch.data import as_batches, data_fingerprint
from mpsearch.layers import discover, require_layers
from mpsearch.names import DEFAULT_ESTIMATOR
from mpsearch.outputs import OutputFn
from mpsearch.quant.quantizer import make_quantizer, quantizer_class, quantizer_name
from mpsearch.safety import HOLDOUT_FRACTION, holdout, safeguard

REFINE = 16  # measured refinement moves tried by default after the solver (``mpsearch.safety.refine``)


@dataclass
class SearchContext:
    """A search resolved and validated by ``resolve``; ``estimate()``, ``solve(table)`` and ``run()`` do the work.

    ``fit``/``check``: the calibration batches the table (and the quantizer) are built on and the ones held out
    for the measured check (both the whole data when ``safe`` is off). ``quantizer``: a name or an instance,
    built on ``fit`` once (``quantizer_for``)."""

    model: nn.Module
    data: list
    options: list[str]
    estimator: object
    solver: object | None = None
    budget: Budget | None = None
    name: str | None = None  # the zoo name, when the model came from the zoo
    loss_fn: object = None
    output_fn: OutputFn | None = None
    include: object = None
    exclude: object = None
    target: str | None = None
    quantizer: object = "rtn"
    safe: bool = True
    refine: int = REFINE
    cache: bool = True
    needs_fitness: bool = False
    fit: list = field(default_factory=list)
    check: list = field(default_factory=list)
    _built: object = None

    @classmethod
    def resolve(
        cls,
        model: nn.Module | str,
        data: Iterable | None = None,
        budget: Budget | None = None,
        estimator=DEFAULT_ESTIMATOR,
        solver=None,
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
    ) -> SearchContext:
        """Check every argument (names, parameters, options the quantizer and target can take, the budget's
        feasibility, include/exclude patterns) and load a zoo model; nothing is estimated yet."""
        est, slv, needs_fitness = search_components(estimator, solver, estimator_params, solver_params)
        quantizer_name(quantizer)
        check_refine(refine)
        if not isinstance(safe, bool) or not isinstance(cache, bool):
            raise MpsearchError(f"safe={safe!r}, cache={cache!r}: both must be True or False", "pass booleans")
        defaults = options is None
        module, data, loss_fn, options, name = _resolve_model(model, data, loss_fn, options, device, target)
        options, qclass = list(options), quantizer_class(quantizer)
        if defaults and target is not None:  # a target's defaults: those this quantizer makes (if any)
            options = [o for o in options if qclass.supports(parse_option(o))] or options
        qclass.check_options(parse_options(options))  # e.g. GPTQ and fp8: refused now
        data = as_batches(data, tokenizer)  # iterated several times
        if budget is not None:
            check_budget(module, budget, options, data[0] if budget.bops is not None else None, include, exclude)
        else:
            require_layers(discover(module, include=include, exclude=exclude)[0])
        fit, check = holdout(data, HOLDOUT_FRACTION) if safe else (data, data)
        return cls(
            module, data, options, est, slv, budget, name, loss_fn, output_fn, include, exclude, target,
            quantizer, safe, refine, cache, needs_fitness, fit, check,
        )  # fmt: skip

    def quantizer_for(self):
        """The Quantizer, built on the fit split once (GPTQ: loaded from the cache when built before)."""
        if self._built is None:
            self._built = make_quantizer(self.quantizer, self.model, self.fit, cache=self.cache)
        return self._built

    def estimate(self) -> CostTable:
        """The cost table on the fit split, recording the model's name, runtime and the runtime's ties."""
        table = self.estimator.estimate(
            self.model,
            self.fit,
            self.options,
            self.loss_fn,
            cache=self.cache,
            output_fn=self.output_fn,
            include=self.include,
            exclude=self.exclude,
            quantizer=self.quantizer_for(),
        )
        record(table, self.name, self.target)
        return table

    def measure_loss(self, table: CostTable):
        """The loss measurements use: the table's resolved one, unless a loss function was given."""
        return table.meta["loss"] if self.loss_fn is None else self.loss_fn

    def fitness(self, data, table: CostTable, q):
        """A PlanFitness on ``data`` measuring as ``table`` was estimated (its loss, its quantizer's weights, the
        runtime's input rounding where the table counted it)."""
        from mpsearch.fitness import PlanFitness

        rounding = bool(table.meta.get("runtime_inputs"))
        return PlanFitness(self.model, data, self.measure_loss(table), self.output_fn, q, runtime_inputs=rounding)

    def solve(self, table: CostTable, budget: Budget | None = None) -> SearchResult:
        """Solve the table under ``budget`` (default: the context's); the plan records the quantizer's spec and
        calibration split."""
        import solvers

        q = self.quantizer_for()
        if self.needs_fitness:
            self.solver.fitness = self.fitness(self.fit, table, q)
        problem = solvers.Problem(table, budget or self.budget)
        result = self.solver.solve(problem)
        result.plan.provenance["quantizer"] = q.spec()  # before the check: its plans inherit the provenance
        if self.fit is not self.data:  # how to take the quantizer's calibration split out of the data again
            result.plan.provenance["calibration"] = {"data": data_fingerprint(self.data), "holdout": HOLDOUT_FRACTION}
        result.extra["problem"] = problem
        return result

    def run(self) -> SearchResult:
        """Estimate, solve and (with ``safe``) refine and check the plan on the held-out split;
        ``result.extra["stages_s"]``: the seconds of each stage (quantizer, estimate, solve, check)."""
        clock, stages = time.perf_counter(), {}

        def lap(name: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            stages[name], clock = round(now - clock, 3), now

        q = self.quantizer_for()
        lap("quantizer")
        table = self.estimate()
        lap("estimate")
        result = self.solve(table)
        problem = result.extra.pop("problem")
        lap("solve")
        if self.safe:
            measure = self.fitness(self.check, table, q)
            result = safeguard(problem, result, measure, self.refine, held_out=self.check is not self.fit)
            lap("check")
        result.extra["table"] = table
        result.extra["quantizer"] = q  # the very quantizer searched with: evaluate(..., quantizer=) reuses it
        result.extra["stages_s"] = stages
        return result


def _resolve_model(model, data, loss_fn, options, device=None, target: str | None = None):
    """A zoo name becomes (module, calibration data, loss, options, name), loaded onto ``device``; a module
    passes through and is used where it lives. A ``target`` runtime picks the options (its defaults, or
    ``options`` named in its family: ``int4_g32`` -> ``torchao:int4_g32``)."""
    if target is not None:
        from mpsearch.runtimes import get_runtime

        options = get_runtime(target).resolve(None if options is None else list(options))
    if isinstance(model, str):
        from mpsearch.models import load

        zoo = load(model, device=device)
        data = zoo.calibration if data is None else data
        return zoo.model, data, loss_fn or zoo.loss, zoo.options if options is None else options, model
    if not isinstance(model, nn.Module):
        raise MpsearchError(f"model is a {type(model).__name__}, not a torch.nn.Module", "pass an nn.Module")
    if data is None:
        raise MpsearchError("no calibration data given", "pass data= (an iterable of batches)")
    if device is not None:
        raise MpsearchError(
            "device= is for zoo model names; a model you pass runs where it lives",
            "move it first (model.to('cuda')) and leave device unset",
        )
    return model, data, loss_fn, DEFAULT_OPTIONS if options is None else options, None


def check_refine(refine) -> None:
    """``refine`` is a count of measurements (0: no refinement)."""
    if not isinstance(refine, int) or isinstance(refine, bool) or refine < 0:
        raise MpsearchError(f"refine={refine!r} is not a count of measurements", "pass an int >= 0 (0: no refinement)")


def _component(obj, params: dict | None, kind: str, package):
    """A validated estimator or solver (``kind``) from a name in ``package.REGISTRY`` (+ params) or an instance."""
    if isinstance(obj, str):
        return getattr(package, f"get_{kind}")(obj, **(params or {}))
    base = getattr(package, kind.capitalize())
    if not isinstance(obj, base):
        raise MpsearchError(
            f"{kind} {obj!r} is not an instance of {base.__name__}", f"use one of {sorted(package.REGISTRY)}"
        )
    if params:
        raise MpsearchError(f"{kind}_params given with a {kind} instance", "set them on the instance")
    obj.validate_params()
    return obj


def make_estimator(estimator, estimator_params: dict | None = None):
    """An Estimator from a registry name (+ params) or an instance, validated."""
    import sensitivity

    return _component(estimator, estimator_params, "estimator", sensitivity)


def make_solver(solver, solver_params: dict | None = None):
    """A Solver from a registry name (+ params) or an instance, validated."""
    import solvers

    return _component(solver, solver_params, "solver", solvers)


def search_components(estimator, solver, estimator_params: dict | None = None, solver_params: dict | None = None):
    """(estimator, solver or None, needs_fitness), validated. A solver that measures plans (a required
    ``fitness``, e.g. "evolutionary") given none gets a stand-in that the search replaces by a PlanFitness on
    the calibration data."""
    import solvers

    est = make_estimator(estimator, estimator_params)
    if solver is None:
        return est, None, False
    solver_params = dict(solver_params or {})
    needs_fitness = (
        isinstance(solver, str)
        and solver in solvers.REGISTRY
        and "fitness" in solvers.REGISTRY[solver].required_params()
        and "fitness" not in solver_params
    )
    slv = make_solver(solver, {**solver_params, "fitness": _placeholder} if needs_fitness else solver_params)
    return est, slv, needs_fitness


def _placeholder(plan) -> float:
    raise RuntimeError("the evolutionary fitness was not set")


def check_budget(
    model: nn.Module, budget: Budget, options: Iterable[str] = DEFAULT_OPTIONS, example=None, include=None, exclude=None
) -> None:
    """Raise InfeasibleBudgetError before any estimation if no plan with ``options`` can meet ``budget``."""
    import solvers

    layers, ties = discover(model, example=example, include=include, exclude=exclude)
    frame = cost_rows(require_layers(layers), parse_options(options)).assign(damage=0.0)
    solvers.Problem(CostTable(frame, {"ties": ties}), budget)


def record(table: CostTable, name: str | None, target: str | None) -> None:
    """What a table records beside its estimate: the zoo model's name, the runtime its options are for (the
    target, or the one family all its options belong to), so plans solved from it can be exported and
    quantized without saying it again, and that runtime's ties (HQQ: the layers of a tag), so that every
    solve, front and search of the table keeps them."""
    from mpsearch.runtimes import get_runtime, runtime_of

    if name:
        table.meta["model"] = name
    families = {runtime_of(parse_option(o)).name for o in table.options}
    runtime = target or (families.pop() if len(families) == 1 else None)
    table.meta["runtime"] = runtime
    if runtime is not None:
        ties = [list(g) for g in table.meta.get("ties", [])]
        ties += [list(g) for g in get_runtime(runtime).ties(table.layers) if list(g) not in ties]
        table.meta["ties"] = ties
