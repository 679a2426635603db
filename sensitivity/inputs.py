"""A runtime's rounding of each layer's input (``Runtime.input_rounding``: llama.cpp's CPU backend rounds a
quantized matmul's input to 8 bits) as damage beside the weight's own, for the estimators that model it.

- ``InputFisher``: during Fisher's draws, for every unit and every rounding its options use, the Fisher
  quadratic form of the rounding error e = R(x) - x of the unit's inputs, 1/2 E[(sum_t g_t . e_t)^2], with g_t
  the draw's score gradient with respect to token t's input. The same estimate of the loss increase as the
  weight's Fisher term, along the error's own direction (the error is known exactly per token, so no diagonal
  is needed). Computed in each input's gradient hook from the input autograd keeps anyway: nothing is stored
  per token.
- ``Measured`` rounds the measured layer's inputs instead (``mpsearch.runtimes.inputs.rounded_inputs``).

No library computes these (Fisher quadratic forms along a runtime's input rounding), hence the hooks here.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import torch
from torch import nn

from mpsearch.runtimes.inputs import Rounding, rounding_of


def roundings(units, options, quantizer) -> dict[str, dict[str, Rounding]]:
    """unit name -> {option name: its rounding} over the options each unit takes whose runtime rounds inputs."""
    out: dict[str, dict[str, Rounding]] = {}
    for unit in units:
        for opt in options:
            rounding = rounding_of(opt) if quantizer.takes(unit, opt) else None
            if rounding is not None:
                out.setdefault(unit.name, {})[opt.name] = rounding
    return out


class InputFisher:
    """Accumulates 1/2 E[(sum_t g_t . e_t)^2] per (unit, rounding) over Fisher's draws (module docstring).

    ``hooks(model)`` taps every unit's matmul inputs (register inside ``hooked``); before each
    backward set ``weight`` to the draw's weight and pass ``leaves`` (inputs that needed no gradient until
    tapped, e.g. the first layer's) as extra ``inputs``; ``end_sample()`` after a sample's draws;
    ``damage(unit, option, samples)`` at the end."""

    def __init__(self, units, options, quantizer) -> None:
        self.by_option = roundings(units, options, quantizer)
        self.sums = {name: dict.fromkeys(set(per.values()), 0.0) for name, per in self.by_option.items()}
        self.units = [u for u in units if u.name in self.sums]
        self.weight = 0.0
        self.leaves: list[torch.Tensor] = []

    def hooks(self, model: nn.Module) -> Iterator:
        for unit in self.units:
            for module in unit.matmuls(model):
                yield module.register_forward_pre_hook(self._tap(self.sums[unit.name]))

    def _tap(self, sums: dict[Rounding, float]):
        def pre_hook(module, args):
            if not args or not isinstance(args[0], torch.Tensor) or not torch.is_grad_enabled():
                return None
            x = args[0]
            if x.requires_grad:  # a view of its own: the gradient of this module's use of x alone
                tapped = x.view_as(x)
            else:
                tapped = x.detach().requires_grad_()
                self.leaves.append(tapped)
            tapped.register_hook(functools.partial(self._accumulate, sums, x.detach()))
            return (tapped, *args[1:])

        return pre_hook

    def _accumulate(self, sums: dict[Rounding, float], x: torch.Tensor, grad: torch.Tensor) -> None:
        g, xf = grad.float(), x.float()
        for runtime, rounding in sums:
            e = runtime.round_input(x, rounding).float().sub_(xf)
            s = float(torch.dot(g.reshape(-1), e.reshape(-1)))
            sums[runtime, rounding] += self.weight * s * s

    def end_sample(self) -> None:
        self.leaves.clear()

    def damage(self, unit, option, samples: int) -> float:
        """1/2 E[(g . e)^2] of ``unit``'s inputs rounded for ``option`` (0.0: its runtime rounds none)."""
        rounding = self.by_option.get(unit.name, {}).get(option.name)
        return 0.0 if rounding is None else 0.5 * self.sums[unit.name][rounding] / samples
