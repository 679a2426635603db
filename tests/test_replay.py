"""Replaying the blocks before the first changed layer (mpsearch.replay) gives bit-identical losses to full
forward passes, recomputes fewer blocks, and leaves the model as it was; models that are no chain of blocks
get full passes."""

import numpy as np
import torch
from torch import nn

from mpsearch.core import BitPlan
from mpsearch.fitness import PlanFitness
from mpsearch.layers import find_units
from mpsearch.testing import snapshot, tiny_transformers


def _plans(names: list[str], n: int, seed: int = 0) -> list[BitPlan]:
    rng = np.random.default_rng(seed)
    plans, current = [], {name: "int8" for name in names}
    for _ in range(n):  # moves of one or two layers, as refinement makes, and now and then a uniform plan
        if rng.random() < 0.2:
            current = {name: str(rng.choice(["int3", "int4", "int8"])) for name in names}
        else:
            for name in rng.choice(names, size=int(rng.integers(1, 3)), replace=False):
                current[name] = str(rng.choice(["int3", "int4", "int8"]))
        plans.append(BitPlan(dict(current)))
    return plans


def _counting(model: nn.Module, blocks) -> list:
    calls = []
    for i, block in enumerate(blocks):
        block.register_forward_hook(lambda m, a, o, i=i: calls.append(i))
    return calls


def test_replayed_losses_are_bit_identical_and_skip_the_unchanged_blocks():
    model, batches = tiny_transformers()["llama"]()
    names = [u.name for u in find_units(model) if not u.type.optional]
    calls = _counting(model, model.model.layers)
    before = snapshot(model)  # (with the test's own counting hooks on)
    full, fast = PlanFitness(model, batches, "kl", replay=False), PlanFitness(model, batches, "kl")
    full_calls, fast_calls = [], []
    for plan in _plans(names, 24):
        calls.clear()
        a = full.losses(plan)
        full_calls.append(len(calls))
        calls.clear()
        b = fast.losses(plan)
        fast_calls.append(len(calls))
        assert np.array_equal(a, b), plan.assignments
    assert sum(fast_calls) < 0.8 * sum(full_calls)  # blocks before the first changed layer were replayed
    assert fast._replay.usable and snapshot(model) == before
    assert all(isinstance(m, type(model.model.layers[0])) for m in model.model.layers)  # originals back


def test_a_model_whose_blocks_are_no_chain_gets_full_passes():
    class Parallel(nn.Module):  # a ModuleList whose blocks all read the input: replaying would be wrong
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.Linear(8, 8) for _ in range(3)])
            self.head = nn.Linear(8, 4)

        def forward(self, x):
            return self.head(sum(torch.tanh(b(x)) for b in self.blocks))

    torch.manual_seed(0)
    model = Parallel().eval()
    data = [torch.randn(16, 8) for _ in range(2)]
    names = [u.name for u in find_units(model)]
    full, fast = PlanFitness(model, data, "kl", replay=False), PlanFitness(model, data, "kl")
    for plan in _plans(names, 10, seed=1):
        assert np.array_equal(full.losses(plan), fast.losses(plan))
    assert fast._replay.usable is False and not fast._replay.records


def test_records_over_the_memory_budget_turn_replay_off():
    model, batches = tiny_transformers()["llama"]()
    names = [u.name for u in find_units(model) if not u.type.optional]
    fast = PlanFitness(model, batches, "kl")
    fast._replay.max_bytes = 1  # nothing fits
    full = PlanFitness(model, batches, "kl", replay=False)
    for plan in _plans(names, 4, seed=2):
        assert np.array_equal(full.losses(plan), fast.losses(plan))
    assert fast._replay.usable is False


def test_the_check_stops_a_move_its_even_fold_rejects_and_decides_exactly_as_before():
    # a move must lower the loss on both folds: once the even batches say no, the odd ones are not measured.
    # The check must return the same plan with the same report as one that measures every batch
    import mpsearch
    import solvers
    from mpsearch.safety import safeguard

    model, batches = tiny_transformers()["llama"]()
    batches = batches * 2  # four batches: two folds of two
    table = mpsearch.estimate(model, batches, "sqnr", ["int3_g16", "int4_g16", "int8"], loss_fn="kl", cache=False)
    problem = solvers.Problem(table, mpsearch.Budget(avg_bits=4.5))
    result = solvers.CoreDP().solve(problem)

    class AllBatches:  # the same fitness without the early stop
        def __init__(self, fitness):
            self.fitness = fitness

        def losses(self, plan):
            return self.fitness.losses(plan)

    reports, passes = [], []
    for fitness in (AllBatches(PlanFitness(model, batches, "kl", replay=False)), PlanFitness(model, batches, "kl")):
        calls = []
        handle = model.lm_head.register_forward_hook(lambda m, a, o, calls=calls: calls.append(1))
        try:
            checked = safeguard(problem, result, fitness, 16, progress=False)
        finally:
            handle.remove()
        reports.append((checked.plan.assignments, {k: v for k, v in checked.extra["safety"].items() if k != "wall_s"}))
        passes.append(len(calls))
    assert reports[0] == reports[1]
    assert passes[1] < passes[0]


def test_an_in_place_op_on_a_recorded_output_turns_replay_off():
    # a block that scales its input in place writes into the output recorded for the block before: replaying
    # that record would scale twice. The version counters catch it, and every pass is a full one from then on
    class HalveThenLinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x):
            return self.lin(x.mul_(0.5))

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), HalveThenLinear(), nn.Linear(8, 4)).eval()
    data = [torch.randn(16, 8) for _ in range(2)]
    names = [u.name for u in find_units(model)]
    full, fast = PlanFitness(model, data, "kl", replay=False), PlanFitness(model, data, "kl")
    fast._replay.max_bytes = 10**9  # a tiny model: its activations outweigh its weights
    for plan in _plans(names, 8, seed=3):
        assert np.array_equal(full.losses(plan), fast.losses(plan))
    assert fast._replay.usable is False
