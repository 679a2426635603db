"""The quantizer: the math that turns a unit's weight into its planned option's values.

A ``Quantizer`` is an explicit object, passed to every estimator, ``PlanFitness``, the measured check,
``evaluate``, ``quantized``, ``apply_plan`` and the exporters (never ambient state). One protocol:

- ``supports(option)`` / ``check_options(options)``: which options it can quantize (a one-line refusal);
- ``quantize(unit, option)``: the unit's fake-quantized weight (output channels first, as ``Unit.weight``);
  its state is keyed by the unit's name (llm-compressor keys by module), never by a tensor's storage;
- ``spec()``: its name, the parameters that decide its math and the fingerprint of its calibration data.

A searched plan records its quantizer's ``spec()`` (``plan.provenance["quantizer"]``). ``for_plan`` gives the
quantizer a plan must be applied or evaluated with: the one passed (checked against the spec), or one rebuilt
exactly from the spec and the calibration data (the search's whole data or its fit split, told apart by
fingerprint), or a saved state loaded from the cache; otherwise a one-line refusal naming what is missing.
There is no silent fallback to another quantizer.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable

import torch

from mpsearch.core import MpsearchError, Option, parse_option
from mpsearch.core.params import Configurable
from mpsearch.names import QUANTIZERS


class Quantizer(Configurable, ABC):
    """Base of the quantizers (see the module docstring). Subclasses implement ``quantize``."""

    component = "quantizer"
    name = "quantizer"

    @classmethod
    def supports(cls, option: Option) -> bool:
        return True

    @classmethod
    def check_options(cls, options: Iterable[Option]) -> None:
        """Refuse, before any work (no instance needed), the options this quantizer cannot quantize."""
        for opt in options:
            if not cls.supports(opt):
                raise MpsearchError(
                    f"quantizer {cls.name!r} cannot quantize option {opt.name!r}",
                    "use int<b>[_g<G>][_asym] or gptq: options with it, or the default quantizer (round to nearest)",
                )

    def takes(self, unit, option: Option) -> bool:
        """Whether this quantizer makes ``option`` for ``unit``: its runtime stores the weight's shape
        (``Unit.takes``) and the quantizer has what the option needs; where not, the unit has no row for the
        option in a cost table and is never quantized with it."""
        return unit.takes(option) and self.supports(option)

    @abstractmethod
    def quantize(self, unit, option: Option | str) -> torch.Tensor:
        """Q(W) of ``unit`` (a ``mpsearch.layers.Unit``) in ``option``, output channels first, in W's dtype."""

    def error(self, unit, option: Option | str) -> torch.Tensor:
        """Q(W) - W in float32, output channels first (one new weight-sized tensor)."""
        return self.quantize(unit, option).float().sub_(unit.weight)

    def hessian(self, unit, shrunk: bool = True) -> torch.Tensor | None:
        """The unit's input Hessian where the quantizer keeps one (GPTQ), else None."""
        return None

    def params(self) -> dict:
        """The parameters that decide the quantized values (not memory or progress settings)."""
        return {}

    def calibration(self) -> str | None:
        """Fingerprint of the calibration data the quantizer's state comes from (None: it has none)."""
        return None

    def spec(self) -> dict:
        return {"name": self.name, "params": self.params(), "calibration": self.calibration()}

    def label(self) -> str:
        """ "rtn", or the name with its parameters, e.g. "gptq(block_size=128, damp=0.01, ...)"."""
        params = ", ".join(f"{k}={v}" for k, v in self.params().items())
        return f"{self.name}({params})" if params else self.name


class RTN(Quantizer):
    """Round to nearest in the option's own runtime math (``mpsearch.quant.formats.quantize_weight``)."""

    name = "rtn"

    def __init__(self) -> None:
        pass

    @classmethod
    def supports(cls, option: Option) -> bool:
        from mpsearch.runtimes.llama_cpp import IMATRIX_ONLY

        return not (option.runtime == "llama.cpp" and option.name in IMATRIX_ONLY)

    @classmethod
    def check_options(cls, options: Iterable[Option]) -> None:
        bad = [o.name for o in options if not cls.supports(o)]
        if bad:
            raise MpsearchError(
                f"{', '.join(bad)}: llama.cpp makes these only with an importance matrix",
                "search with --quantizer imatrix (or --imatrix FILE), or leave them out of --options",
            )

    def quantize(self, unit, option: Option | str) -> torch.Tensor:
        from mpsearch.quant.formats import quantize_weight

        return quantize_weight(unit.weight, parse_option(option) if isinstance(option, str) else option)


def make_quantizer(quantizer, model, batches: list, cache: bool = True, progress: bool = True) -> Quantizer:
    """A Quantizer from a name in ``QUANTIZERS`` (None: "rtn"; "gptq" is built on ``model`` and ``batches``,
    or loaded from the cache when an identical one was built before) or an instance (passed through)."""
    if isinstance(quantizer, Quantizer):
        quantizer.validate_params()
        if cache and quantizer.name == "imatrix":  # e.g. read from a file: later commands find it by its spec
            from mpsearch.quant.gptq_cache import store_state

            store_state(model, quantizer)
        return quantizer
    if quantizer_name(quantizer) == "rtn":
        return RTN()
    from mpsearch.quant.gptq_cache import cached_gptq, cached_imatrix

    if quantizer_name(quantizer) == "imatrix":
        return cached_imatrix(model, batches, cache=cache, progress=progress)
    return cached_gptq(model, batches, {}, cache=cache, progress=progress)


def quantizer_class(quantizer) -> type[Quantizer]:
    """The class of a quantizer name (None: "rtn") or instance."""
    if isinstance(quantizer, Quantizer):
        return type(quantizer)
    if quantizer_name(quantizer) == "rtn":
        return RTN
    if quantizer_name(quantizer) == "imatrix":
        from mpsearch.quant.imatrix import Imatrix

        return Imatrix
    from mpsearch.quant.gptq import GPTQ

    return GPTQ


def quantizer_name(quantizer) -> str:
    """The quantizer's name ("rtn" for None); anything that is not a quantizer is a one-line error."""
    if quantizer is None:
        return "rtn"
    if isinstance(quantizer, Quantizer):
        return quantizer.name
    if isinstance(quantizer, str) and quantizer in QUANTIZERS:
        return quantizer
    raise MpsearchError(f"unknown quantizer {quantizer!r}", f"use one of {list(QUANTIZERS)} or a Quantizer instance")


def plan_spec(plan) -> dict | None:
    """The quantizer spec a plan records (None: none recorded, e.g. a hand-written plan). Plans of older
    versions recorded only a name: {"name": ...} then."""
    provenance = getattr(plan, "provenance", None) or {}
    spec = provenance.get("quantizer")
    if spec is None:
        return None
    return {"name": spec} if isinstance(spec, str) else dict(spec)


def _differences(have: dict, want: dict) -> list[str]:
    out = []
    if have.get("name") != want.get("name"):
        return [f"quantizer {have.get('name')!r} instead of {want.get('name')!r}"]
    for key, value in (want.get("params") or {}).items():
        if (have.get("params") or {}).get(key) != value:
            out.append(f"{key}={(have.get('params') or {}).get(key)!r} instead of {value!r}")
    if want.get("calibration") is not None and have.get("calibration") != want.get("calibration"):
        out.append(f"calibration data {have.get('calibration')} instead of {want.get('calibration')}")
    return out


def for_plan(model, plan, quantizer=None, calibration: Iterable | None = None, what: str = "apply") -> Quantizer:
    """The quantizer ``plan`` must be applied or evaluated with (``what``: for messages).

    ``quantizer``: None (the plan's own), a name or an instance; an instance or name that differs from the
    plan's recorded spec is refused. A GPTQ plan is rebuilt exactly from its spec: on ``calibration`` when it
    is the data the quantizer was built on, or the data the search split it from (its fit split is taken
    again); from the cache when an identical quantizer was saved there; otherwise a one-line refusal."""
    spec = plan_spec(plan)
    if isinstance(quantizer, Quantizer):
        if spec is not None and (diff := _differences(quantizer.spec(), spec)):
            raise MpsearchError(
                f"cannot {what} this plan with the given quantizer: it was searched with {spec_label(spec)}, the "
                f"quantizer has {', '.join(diff)}",
                "pass the quantizer the plan was searched with, or quantizer=None and calibration= its data",
            )
        quantizer.validate_params()
        return quantizer
    name = quantizer_name(quantizer) if quantizer is not None else (spec or {"name": "rtn"})["name"]
    if spec is not None and spec["name"] != name:
        raise MpsearchError(
            f"cannot {what} this plan with quantizer {name!r}: it was searched with {spec_label(spec)}",
            f"leave quantizer unset (or pass {spec['name']!r}) to measure the model the search chose",
        )
    if name == "rtn":
        return RTN()
    from mpsearch.quant.gptq_cache import cached_gptq, cached_imatrix, load_cached

    build = cached_gptq if name == "gptq" else lambda m, b, params: cached_imatrix(m, b)
    if spec is None or "params" not in spec:  # no spec recorded: a quantizer built here on the data given
        if calibration is None:
            raise MpsearchError(
                f"quantizer {name!r} needs calibration data to {what} a plan that records no {name} spec",
                "pass calibration= (the data to collect its statistics from), or search the plan again",
            )
        from mpsearch.data import as_batches

        return build(model, as_batches(calibration), {})
    if calibration is None or (spec.get("params") or {}).get("file"):
        state = load_cached(model, spec)
        if state is not None:
            return state
        if (spec.get("params") or {}).get("file"):
            raise MpsearchError(
                f"this plan was searched with the imatrix file {spec['params']['file']}, which is not cached here, "
                f"so it cannot {what} it with the searched math",
                "pass quantizer=Imatrix.from_gguf(that file, model) (CLI: --imatrix FILE)",
            )
        raise MpsearchError(
            f"this plan was searched with {spec_label(spec)} on calibration data {spec.get('calibration')}, which "
            f"is neither given nor cached, so it cannot {what} it with the searched math",
            "pass calibration= the data given to search (or quantizer= the instance it was searched with; CLI: "
            "--calib with the text and --seq-len/--n-calib given to search)",
        )
    batches = calibration_split(plan, calibration, spec)
    return build(model, batches, spec["params"])


def calibration_split(plan, calibration: Iterable, spec: dict) -> list:
    """The batches a plan's quantizer was built on, out of ``calibration``: the data itself when its
    fingerprint is the spec's, or the fit split of it when it is the data the search held a check split
    out of (``plan.provenance["calibration"]``); anything else is refused."""
    from mpsearch.data import as_batches, data_fingerprint

    batches = as_batches(calibration)
    given = data_fingerprint(batches)
    if given == spec.get("calibration"):
        return batches
    split = (plan.provenance or {}).get("calibration") or {}
    if split.get("data") == given:
        from mpsearch.safety import holdout

        fit, _ = holdout(batches, split["holdout"])
        if data_fingerprint(fit) == spec.get("calibration"):
            return fit
    raise MpsearchError(
        f"the calibration data given (fingerprint {given}) is not the data this plan's {spec['name']} was built "
        f"on ({spec.get('calibration')}) nor the data its search split it from ({split.get('data')})",
        "pass the very batches given to search (same order, same tensors)",
    )


def spec_label(spec: dict) -> str:
    params = ", ".join(f"{k}={v}" for k, v in (spec.get("params") or {}).items())
    return f"{spec['name']}({params})" if params else spec["name"]
