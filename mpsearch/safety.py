"""A searched plan is only kept if it measures better than doing nothing clever.

The cost table is additive and predicted; the model is neither. After the solver, ``search`` (unless told
``safe=False``):

1. **refines** the plan with measured local search on a held-out split of the calibration data: moves
   ranked by the table (an upgrade that fits the unused budget, or an upgrade paired with a downgrade that
   pays for it) are tried best-predicted first, and a move is kept only when the measured loss drops on
   both folds of the split (even and odd batches), not through the noise of a few samples;
2. **compares** the result with every uniform option of the table that meets the budget, measured on the
   same split, and returns whichever measures best (a uniform option when it wins).

Both steps use ``PlanFitness`` on the held-out split: one forward pass over it per evaluation, only the
changed layers re-quantized. Written here because the move set (ranked by the solver's own table, checked
against its budget) is specific to mpsearch's problem; no library does measured refinement of a knapsack.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from mpsearch.core import SearchResult
from mpsearch.data import n_samples, split, take

HOLDOUT_FRACTION = 0.25  # of the calibration batches held out of the estimate for the measured check


def holdout(batches: list, fraction: float = HOLDOUT_FRACTION) -> tuple[list, list]:
    """(fit, check): the last ``fraction`` of the batches (at least one) held out; a single batch is split by
    samples. With one sample there is nothing to hold out: (batches, batches). A check of one batch is cut
    in two, so that refinement has two folds to agree on (see ``_better``)."""
    if len(batches) >= 2:
        k = max(1, int(len(batches) * fraction))
        fit, check = batches[:-k], batches[-k:]
    else:
        n = n_samples(batches[0])
        if n < 2:
            return batches, batches
        k = max(1, int(n * fraction))
        fit, check = [take(batches[0], 0, n - k)], [take(batches[0], n - k, k)]
    if len(check) == 1 and n_samples(check[0]) >= 2:
        check = split(check[0], -(-n_samples(check[0]) // 2))
    return fit, check


@dataclass
class SafetyReport:
    """What the measured check found: losses on the held-out split (lower is better)."""

    searched_loss: float
    refined_loss: float
    refine_moves: int
    refine_evals: int
    uniform_losses: dict[str, float] = field(default_factory=dict)
    chosen: str = "searched"  # "searched", "refined" or "uniform-<option>"
    held_out: bool = True
    wall_s: float = 0.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def uniform_choices(problem) -> dict[str, np.ndarray]:
    """Option -> its uniform choice, for options every unit can take and whose plan meets the budget."""
    out = {}
    for code, name in enumerate(problem.option_names):
        has = problem.option_codes == code
        if has.any(axis=1).all():
            choice = np.argmax(has, axis=1)
            if problem.is_feasible(choice):
                out[name] = choice
    return out


MOVE_WIDTH = 384  # upgrades and downgrades ranked per kind when moves are formed (``_moves``)
MAX_DOWNGRADES = 8  # most downgrades one move may spend to pay for an upgrade


def _moves(problem, choice: np.ndarray, width: int = MOVE_WIDTH) -> list[tuple[float, dict[int, int]]]:
    """Feasible single upgrades, (upgrade, downgrade) pairs and (upgrade, several downgrades) bundles from
    ``choice``, best predicted first: (predicted change of total damage, {unit: new option index}). Pairs are
    formed between the ``width`` upgrades of best predicted gain per budget spent and the ``width`` downgrades
    of least damage added per budget freed (all of them on tables with fewer (unit, option) rows), so a move
    pairs a costly upgrade with the downgrade that pays for it; an upgrade no single downgrade pays for gets
    the cheapest downgrades of other units, in that order, until it fits (at most ``MAX_DOWNGRADES``)."""
    idx = np.arange(problem.n_units)
    damage = np.where(problem.valid, problem.damage, np.inf)
    costs = np.stack([np.where(problem.valid, c, np.inf) for c in problem.costs])  # (K, n, m)
    slack = problem.slack(choice)
    gain = damage - damage[idx, choice][:, None]  # < 0: predicted better
    extra = costs - costs[:, idx, choice][..., None]  # (K, n, m): what each change adds to each constraint
    share = extra / problem.limits()[:, None, None]  # the same as a share of each budget, to rank by
    moves = []
    up_u, up_k = np.nonzero(gain < 0)
    up_cost = extra[:, up_u, up_k]  # (K, U)
    fits = np.all(up_cost <= slack[:, None], axis=0)
    moves += [(float(gain[u, k]), {int(u): int(k)}) for u, k in zip(up_u[fits], up_k[fits])]
    down_u, down_k = np.nonzero((gain >= 0) & np.any(extra < 0, axis=0))
    down_cost = extra[:, down_u, down_k]
    ups = np.argsort(gain[up_u, up_k] / np.maximum(share[:, up_u, up_k].max(axis=0), 1e-12))[:width]
    downs = np.argsort(gain[down_u, down_k] / np.maximum(-share[:, down_u, down_k].min(axis=0), 1e-12))[:width]
    pair_cost = up_cost[:, ups, None] + down_cost[:, None, downs]  # (K, U, D)
    ok = np.all(pair_cost <= slack[:, None, None], axis=0)
    ok &= up_u[ups][:, None] != down_u[downs][None, :]
    net = gain[up_u, up_k][ups][:, None] + gain[down_u, down_k][downs][None, :]
    for a, b in zip(*np.nonzero(ok)):
        u, k, v, j = up_u[ups[a]], up_k[ups[a]], down_u[downs[b]], down_k[downs[b]]
        moves.append((float(net[a, b]), {int(u): int(k), int(v): int(j)}))
    for a in np.nonzero(~ok.any(axis=1))[0]:  # no single downgrade pays for this upgrade: bundle several
        move = _bundle(int(up_u[ups[a]]), int(up_k[ups[a]]), down_u[downs], down_k[downs], extra, slack)
        if move is not None:
            moves.append((float(sum(gain[u, k] for u, k in move.items())), move))
    moves.sort(key=lambda m: m[0])
    return moves


def _bundle(u: int, k: int, down_u, down_k, extra: np.ndarray, slack: np.ndarray) -> dict[int, int] | None:
    """Upgrade (u, k) plus the first downgrades of other units (one each, in ranked order) that make it fit
    every constraint, or None when ``MAX_DOWNGRADES`` of them do not."""
    move, cost = {u: k}, extra[:, u, k].copy()
    for v, j in zip(down_u.tolist(), down_k.tolist()):
        if v in move or not np.any(extra[:, v, j] < 0):
            continue
        move[v] = j
        cost += extra[:, v, j]
        if np.all(cost <= slack):
            return move
        if len(move) > MAX_DOWNGRADES:
            return None
    return None


def _better(new: np.ndarray, old: np.ndarray) -> bool:
    """Whether measured losses ``new`` beat ``old``: a lower mean and, with per-batch losses of two or more
    batches, a lower mean on each of the two folds (even and odd batches), so that a move which only fits
    the noise of some batches is not kept."""
    new, old = np.atleast_1d(new), np.atleast_1d(old)
    if np.isnan(new).any():  # a measurement stopped early: its even fold already rejected it
        return False
    if new.mean() >= old.mean():
        return False
    return len(new) < 2 or (new[0::2].mean() < old[0::2].mean() and new[1::2].mean() < old[1::2].mean())


def refine(problem, choice: np.ndarray, loss, measure: Callable[..., object], max_evals: int, early_stop: bool = False):
    """Measured local search from ``choice`` (measured ``loss``), at most ``max_evals`` more measurements:
    (choice, its measured loss, moves kept, measurements made). ``measure`` returns a loss or per-batch
    losses (then a move must lower both folds' losses: see ``_better``); with ``early_stop``, it is called as
    ``measure(candidate, best)`` and may stop a measurement the even fold already rejects (NaN losses)."""
    best, evals, kept = loss, 0, 0
    tried: set = set()
    while evals < max_evals:
        improved = False
        for _, move in _moves(problem, choice):
            key = (tuple(choice), tuple(sorted(move.items())))
            if key in tried:
                continue
            tried.add(key)
            candidate = choice.copy()
            for u, k in move.items():
                candidate[u] = k
            loss = measure(candidate, best) if early_stop else measure(candidate)
            evals += 1
            if _better(loss, best):
                choice, best, kept, improved = candidate, loss, kept + 1, True
                break
            if evals >= max_evals:
                break
        if not improved:
            break
    return choice, best, kept, evals


def safeguard(
    problem, result: SearchResult, fitness, max_evals: int = 16, held_out: bool = True, progress: bool = True
) -> SearchResult:
    """Refine ``result`` with measured moves, compare it with the uniform options within the budget, and
    return the best measured plan; ``result.extra["safety"]`` holds the comparison (and its seconds),
    ``result.extra["searched_plan"]`` the solver's plan. ``progress``: a bar over the measurements (at most
    1 + ``max_evals`` + one per uniform option)."""

    def plan_of(choice):
        return problem.result(choice, "feasible", "", {}, 0.0).plan

    uniforms = uniform_choices(problem)
    bar = tqdm(total=1 + max_evals + len(uniforms), desc="measured check", disable=not progress, leave=False)

    stops = "give_up" in inspect.signature(fitness.losses).parameters if hasattr(fitness, "losses") else False

    def measure(choice, against=None) -> np.ndarray:  # per-batch losses where the fitness has them
        plan = plan_of(choice)
        bar.update()
        if not hasattr(fitness, "losses"):
            return np.atleast_1d(float(fitness(plan)))
        if not stops or against is None or len(against) < 2:
            return np.atleast_1d(fitness.losses(plan))
        even = np.atleast_1d(against)[0::2].mean()
        return np.atleast_1d(fitness.losses(plan, give_up=lambda losses: losses.mean() >= even))

    try:
        return _safeguard(problem, result, measure, max_evals, held_out, uniforms)
    finally:
        bar.close()


def _safeguard(problem, result: SearchResult, measure, max_evals: int, held_out: bool, uniforms: dict):
    began = time.perf_counter()
    start = problem.choice_of(result.plan)
    searched = measure(start)
    choice, losses, moves, evals = refine(problem, start, searched, measure, max_evals, early_stop=True)
    loss = float(losses.mean())
    chosen = "refined" if moves else "searched"
    report = SafetyReport(float(searched.mean()), loss, moves, evals, held_out=held_out, chosen=chosen)
    best_choice = choice
    for option, uniform in uniforms.items():
        report.uniform_losses[option] = float(measure(uniform).mean())
        if report.uniform_losses[option] < loss:
            loss, best_choice, report.chosen = report.uniform_losses[option], uniform, f"uniform-{option}"
    if best_choice is start:
        out = result
    else:
        # no longer the table's optimum: feasible, and its gap to that optimum is not a bound on anything
        kept = result.plan.provenance
        out = problem.result(
            best_choice, "feasible", kept.get("solver", ""), kept.get("solver_params", {}), result.wall_time_s, math.nan
        )
        out.plan.provenance = {**kept, **{k: v for k, v in out.plan.provenance.items() if k not in kept}}
        out.extra.update(result.extra)
    report.wall_s = time.perf_counter() - began
    out.extra["safety"] = report.to_dict()
    out.extra["searched_plan"] = result.plan
    out.plan.provenance["safety"] = report.chosen
    return out
