"""Recompute a plan's forward pass only from the first block whose weights changed.

Most models people quantize are a chain of blocks (a transformers decoder's ``model.layers``, an
``nn.Sequential``): block i's input is block i - 1's output, and its output depends only on that input and its
own weights. Measuring many plans that differ in a few layers (the measured check's refinement, the
evolutionary search) then repeats the blocks before the first changed layer with the very same inputs and
weights. ``Replay`` records each block's output per batch on one evaluation and, on the next, swaps the blocks
before the first changed one for stand-ins that return the recorded outputs; the rest runs as usual. The
losses are bit-identical to full forward passes (tests/test_replay.py).

Only where it is safe: the chain is checked on the first recorded pass (each block's input must be the very
tensor the block before returned), and recording stops when the recorded outputs would exceed
``max_bytes`` (default: a quarter of the model's weight bytes); otherwise every pass is a full one. The
stand-ins are put in the model's own containers only inside a pass and the original modules are put back in
``finally``, so the caller's model is the same object tree afterwards, also after an error or Ctrl-C.
Written here because no library replays a partial forward pass of an arbitrary ``nn.Module``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from mpsearch.outputs import hooked

MAX_BYTES_FRACTION = 0.25  # recorded block outputs may take this share of the model's weight bytes


class _Recorded(nn.Module):
    """Stands in for a block: returns what the block returned on the recorded pass of this batch."""

    def __init__(self, output) -> None:
        super().__init__()
        self.output = output

    def forward(self, *args, **kwargs):
        return self.output


def _trunk(model: nn.Module, units: Iterable) -> tuple[nn.Module, str] | None:
    """The container (ModuleList or Sequential) of blocks holding the most planned weights in two or more of
    its children, and its name; None when there is none."""
    names = [n for u in units for n in u.names]
    best, best_count = None, 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList | nn.Sequential) or len(module) < 2:
            continue
        prefix = f"{name}." if name else ""
        holding = {n[len(prefix) :].split(".", 1)[0] for n in names if n.startswith(prefix)}
        count = sum(1 for n in names if n.startswith(prefix))
        if len(holding) >= 2 and count > best_count:
            best, best_count = (module, name), count
    return best


def _first(output):
    return output[0] if isinstance(output, tuple | list) and output else output


def _versions(output) -> tuple:
    """The in-place version counters of an output's tensors: a later in-place op (``ReLU(inplace=True)``)
    bumps them, and a record changed that way can no longer stand in for the block."""
    if isinstance(output, torch.Tensor):
        return (output._version,)
    if isinstance(output, tuple | list):
        return tuple(v for o in output for v in _versions(o))
    return ()


def _nbytes(output) -> int:
    if isinstance(output, torch.Tensor):
        return output.numel() * output.element_size()
    if isinstance(output, tuple | list):
        return sum(_nbytes(o) for o in output)
    return 0


class Replay:
    """Per-batch block outputs of the latest pass (see the module docstring). ``block_of(unit)``: the index of
    the block holding the unit (-1: before the blocks, e.g. embeddings; ``len(blocks)``: after them)."""

    def __init__(self, model: nn.Module, units: Iterable, max_bytes: int | None = None) -> None:
        units = list(units)
        found = _trunk(model, units)
        self.blocks: nn.Module | None = found[0] if found else None
        self._index: dict = {}
        if found is not None:
            prefix = f"{found[1]}." if found[1] else ""
            keys = list(self.blocks._modules)
            order = {n: i for i, (n, _) in enumerate(model.named_modules())}
            for unit in units:
                where = []
                for n in unit.names:
                    head = n[len(prefix) :].split(".", 1)[0] if n.startswith(prefix) else None
                    if head in keys:
                        where.append(keys.index(head))
                    else:  # outside the blocks: before them (embeddings) or after (norm, lm_head)
                        where.append(-1 if order[n] < order[found[1]] else len(keys))
                self._index[unit] = min(where)
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        self.max_bytes = int(weights * MAX_BYTES_FRACTION) if max_bytes is None else max_bytes
        # batch -> (the weights it was run with, each block's output, their in-place version counters)
        self.records: dict[int, tuple[dict, list, list]] = {}
        self.usable: bool | None = None if found else False  # None: the first full pass checks the chain

    def block_of(self, unit) -> int:
        return self._index.get(unit, -1)

    def first_changed(self, batch: int, weights: dict) -> int:
        """The first block whose weights differ from those batch ``batch`` was last recorded with (0: no record;
        ``len(blocks)``: none differs). ``weights``: unit -> an object that changes whenever its weight does."""
        if batch not in self.records:
            return 0
        old = self.records[batch][0]
        changed = [u for u in old.keys() | weights.keys() if old.get(u) is not weights.get(u)]
        return max(0, min((self.block_of(u) for u in changed), default=len(self.blocks._modules)))

    @contextmanager
    def pass_from(self, batch: int, weights: dict) -> Iterator[None]:
        """Within the block, a forward pass of batch ``batch`` with ``weights`` (unit -> an object that changes
        whenever its weight does) replays the blocks before the first changed one from the records and
        records the outputs of the others."""
        if self.usable is False:
            yield
            return
        keys = list(self.blocks._modules)
        start = self.first_changed(batch, weights)
        recorded = self.records[batch][1] if start else None
        outputs: list = list(recorded[:start]) if start else []
        versions: list = list(self.records[batch][2][:start]) if start else []
        inputs: list = []
        originals = {k: self.blocks._modules[k] for k in keys[:start]}

        def keep_input(module, args, kwargs):
            inputs.append(args[0] if args else next(iter(kwargs.values()), None))

        def keep_output(module, args, output):
            outputs.append(output)
            versions.append(_versions(output))

        live = [self.blocks._modules[k] for k in keys[start:]]
        hooks = itertools.chain(  # registered inside ``hooked``: removed even if a registration fails
            (m.register_forward_pre_hook(keep_input, with_kwargs=True) for m in live),
            (m.register_forward_hook(keep_output) for m in live),
        )
        try:
            for i, k in enumerate(keys[:start]):
                self.blocks._modules[k] = _Recorded(recorded[i])
            with hooked(hooks):
                yield
        finally:
            for k, module in originals.items():
                self.blocks._modules[k] = module
        self._store(batch, dict(weights), start, inputs, outputs, versions)

    def _store(self, batch: int, weights: dict, start: int, inputs: list, outputs: list, versions: list) -> None:
        """Keep the pass's outputs, or stop replaying: when a block ran other than once, when the first full
        pass shows the blocks are no chain, when a later op changed a recorded output in place, or when the
        records would exceed ``max_bytes``."""
        ran_once = len(outputs) == len(self.blocks._modules)
        if ran_once and any(_versions(o) != v for o, v in zip(outputs, versions)):
            ran_once = False  # an in-place op wrote into a recorded output: replaying it would be wrong
        if ran_once and self.usable is None and start == 0:
            self.usable = all(x is outputs[i - 1] or x is _first(outputs[i - 1]) for i, x in enumerate(inputs) if i)
        others = sum(_nbytes(o) for b, (_, r, _) in self.records.items() if b != batch for o in r)
        if not ran_once or not self.usable or others + _nbytes(outputs) > self.max_bytes:
            self.usable, self.records = False, {}
            return
        self.records[batch] = (weights, outputs, versions)
