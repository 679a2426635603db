"""A runtime target: the options a runtime stores exactly, and how a plan is written for it."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable

from mpsearch.core import BitPlan, MpsearchError, Option, parse_option


class Target(ABC):
    """One runtime. ``runtime``: the ``Option.runtime`` of the options it stores (their sizes and quantization
    math are the runtime's own); ``prefix``: what turns a bare option name into this family's
    (``int4_g32`` -> ``torchao:int4_g32``); ``default_options``: what ``--target`` searches when no options are
    given; ``accepted``: the accepted options, in words, for error messages."""

    name: str
    runtime: str
    prefix: str = ""
    default_options: tuple[str, ...] = ()
    accepted: str = ""

    def accepts(self, option: Option) -> bool:
        return option.runtime == self.runtime

    def resolve(self, names: Iterable[str] | None) -> list[str]:
        """This target's option names for ``names`` (None: its defaults); bare names get the prefix."""
        if names is None:
            return list(self.default_options)
        out = []
        for name in names:
            full = name if ":" in name or not self.prefix else self.prefix + name
            opt = parse_option(full)
            if not self.accepts(opt):
                raise MpsearchError(
                    f"option {name!r} is not a {self.name} option", f"{self.name} stores {self.accepted}"
                )
            out.append(full)
        return out

    def ties(self, layers: Iterable[str]) -> list[tuple[str, ...]]:
        """Groups of layers this runtime configures as one (they must share an option); none by default."""
        return []

    def check(self, plan: BitPlan) -> None:
        """Raise naming the first layer whose option this runtime cannot store exactly."""
        for layer, name in plan.items():
            if not self.accepts(parse_option(name)):
                raise MpsearchError(
                    f"layer {layer!r} has option {name!r}, which {self.name} cannot store as searched",
                    f"search with --target {self.name} (options: {self.accepted})",
                )

    def export(self, plan: BitPlan, **kwargs) -> str:
        self.check(plan)
        return self.render(plan, **kwargs)

    @abstractmethod
    def render(self, plan: BitPlan, **kwargs) -> str:
        """The file the runtime reads, for a plan already checked."""
