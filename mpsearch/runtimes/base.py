"""A runtime: ONE registration for a format family (torchao's one handler per config type is the model).

It holds the family's option grammar (``parse``), exact storage bits (``storage_bits_for``), the shapes it
accepts (``fits_row``), the ties it imposes (``ties``), its fake quantization (``fake_quantize``: bit-exact
with the runtime's own decoder), whether GPTQ can use its grid (``gptq_grid``) and its writer (``render``).
As a target (``--target``) it searches its own options (``resolve``) and exports exactly those (``check``).
Adding a runtime is one module with a ``Runtime`` subclass and one ``register_runtime`` line in
``mpsearch/runtimes/__init__.py``. Nothing here imports torch at module level: ``import mpsearch`` stays light.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable

from mpsearch.core.errors import MpsearchError

SCALE_BITS = 16  # scales (and HQQ's zeros) are stored as fp16/bf16


class UniformGrid:
    """A grid GPTQ's column loop quantizes on: integers ``lo`` ... ``hi``; ``fit(cols)`` (a group's columns,
    rows first) -> (scale, zero, decode scale) per row; a column x is stored as q = clamp(round(x / scale) +
    zero, lo, hi) and decoded as (q - zero) * decode. Subclasses set ``lo``, ``hi`` and ``fit``."""

    lo: int
    hi: int

    def snap(self, col, fit, k: int):
        """(decoded values, None: no stored index is kept) of column ``k`` of a group with ``fit``."""
        import torch

        scale, zero, decode = fit
        return (torch.clamp(torch.round(col / scale) + zero, self.lo, self.hi) - zero) * decode, None


class Runtime(ABC):
    """One runtime (see the module docstring). ``name``: the target name; ``family``: the ``Option.runtime``
    of the options it owns; ``prefix``: what turns a bare option name into this family's (``int4_g32`` ->
    ``torchao:int4_g32``); ``default_options``: what ``--target`` searches when no options are given;
    ``accepted``: its options, in words, for error messages; ``writer_only``: a writer with no grammar of
    its own (the plan JSON)."""

    name: str
    family: str
    prefix: str = ""
    default_options: tuple[str, ...] = ()
    accepted: str = ""
    writer_only: bool = False
    writer: str | None = None  # "module:function" writing the runtime's own file (mpsearch.artifacts)
    writes_file: bool = False  # that file is one file (a GGUF), not a saved-model folder

    # -- grammar, storage, shapes ------------------------------------------------------------------------
    @abstractmethod
    def parse(self, name: str):
        """The ``Option`` named ``name`` if it is this family's (None if not; InvalidOptionError if it is
        this family's but malformed)."""

    @abstractmethod
    def storage_bits_for(self, option, out_channels, row_length):
        """Total bits the runtime stores for a weight (ints, or numpy arrays for many layers at once)."""

    def scales_for(self, option, out_channels, row_length):
        """Scales stored (one per output channel, or per group along the row)."""
        if option.group_size is None:
            return out_channels
        return out_channels * (-(-row_length // option.group_size))  # ceil division, also on arrays

    def fits_row(self, option, row_length):
        """Whether rows of this length (an int or a numpy array) can be stored: whole groups by default."""
        unit = self.storage_unit(option)
        return row_length % unit == 0 if unit else row_length == row_length

    def storage_unit(self, option) -> int | None:
        """The row length the runtime stores in whole units (a block, a group), or None."""
        return option.group_size

    # -- quantization math -------------------------------------------------------------------------------
    @abstractmethod
    def fake_quantize(self, w, option):
        """Q(w) decoded exactly as the runtime decodes it, for (out, row) rows that are whole storage units."""

    def quantize(self, w, option):
        """Q(w) of any weight (output channels first): rows that are not whole units (which the runtime cannot
        store: such layers have no row for the option in a cost table) are zero-padded so estimators run."""
        import torch

        rows = w.detach().reshape(w.shape[0], -1)
        unit = self.storage_unit(option) or rows.shape[1]
        pad = (-rows.shape[1]) % unit
        padded = torch.nn.functional.pad(rows, (0, pad)) if pad else rows
        return self.fake_quantize(padded, option)[:, : rows.shape[1]].reshape(w.shape)

    def reference(self, w, option):
        """The runtime's own storage and decoding of ``w`` (out, row), from its own package, for conformance
        checks (``mpsearch.testing.check_runtime``, ``experiments/bench_targets.py``): (bytes it stores, its
        decoded values or None where only the layout can be counted). None: no runtime besides mpsearch's
        code to compare with; raises ImportError when the runtime's package is not installed."""
        return None

    def input_rounding(self, option) -> str | None:
        """How the runtime rounds the input of a matmul with an ``option`` weight (a name ``round_input`` takes),
        or None: inputs used as they are (the default). Estimators that model it add its damage to the
        option's (``sensitivity.Fisher``, ``sensitivity.Measured``)."""
        return None

    def round_input(self, x, rounding: str):
        """``x`` as the runtime rounds it under ``rounding`` (an ``input_rounding`` name), in x's dtype."""
        raise NotImplementedError(f"runtime {self.name!r} rounds no inputs")

    def gptq_grid(self, option):
        """The grid GPTQ's column loop quantizes ``option`` on, or None (GPTQ cannot): an object with
        ``fit(cols)`` (a group's columns in their original order -> its fit) and ``snap(col, fit, k)`` (->
        values and stored indices or None), e.g. a ``UniformGrid`` (``native.IntGrid``,
        ``gptqmodel.GPTQGrid``) or ``mpsearch.quant.gptq_gguf.BlockGrid`` (with ``group_size``: a GGUF
        block)."""
        return None

    # -- as a target: options searched and written ---------------------------------------------------------
    def accepts(self, option) -> bool:
        return option.runtime == self.family

    def resolve(self, names: Iterable[str] | None) -> list[str]:
        """This target's option names for ``names`` (None: its defaults); bare names get the prefix."""
        from mpsearch.core.options import parse_option

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

    def check(self, plan) -> None:
        """Raise naming the first layer whose option this runtime cannot store exactly."""
        from mpsearch.core.options import parse_option

        for layer, name in plan.items():
            if not self.accepts(parse_option(name)):
                raise MpsearchError(
                    f"layer {layer!r} has option {name!r}, which {self.name} cannot store as searched",
                    f"search with --target {self.name} (options: {self.accepted})",
                )

    def export(self, plan, **kwargs) -> str:
        self.check(plan)
        return self.render(plan, **kwargs)

    @abstractmethod
    def render(self, plan, **kwargs) -> str:
        """The file the runtime reads, for a plan already checked."""

    # -- the runtime's own model file (``mpsearch.quantize``) ------------------------------------------------
    def write(self, model, plan, quantizer, out, **kwargs) -> dict:
        """Write the quantized model at ``out`` with ``writer``; returns {"tensor_bytes": {name: bytes}}."""
        import importlib

        module, _, function = (self.writer or "").partition(":")
        return getattr(importlib.import_module(module), function)(model, plan, quantizer, out, **kwargs)

    def side_files(self, plan, out, quantizer=None, model=None) -> list[str]:
        """Files written beside ``out`` for the runtime's own tools (e.g. llama-quantize's inputs)."""
        return []


def row_of(shape: tuple[int, ...]) -> int:
    return math.prod(shape[1:]) if len(shape) > 1 else 1
