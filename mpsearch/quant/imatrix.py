"""llama.cpp's importance matrix (imatrix) as mpsearch's quantizer: llama.cpp types quantized exactly as
``llama-quantize --imatrix`` does.

The imatrix of a weight is, per input column, the mean over calibration tokens of the squared activation
entering it (``llama-imatrix``: ``in_sum2 / counts``; real tokens only, padding left out). ``Imatrix(model,
batches)`` collects it for every unit whose inputs enter a matmul (``nn.Linear``, ``Conv1D``) in one
calibration pass, keyed by unit name; ``Imatrix.from_gguf(path, model)`` reads one written by
``llama-imatrix`` (or by ``save_gguf``). As a ``Quantizer``, ``quantize(unit, option)`` runs the option's
``quant_weights`` path with the unit's entry (:mod:`mpsearch.quant.llama_cpp`); units without an entry
(embeddings: llama-imatrix collects none for ``token_embd``) take the reference path, as llama-quantize
does. ``save_gguf`` writes llama.cpp's imatrix GGUF (``<tensor>.in_sum2``, ``<tensor>.counts``,
``imatrix.*`` metadata), which ``llama-quantize --imatrix`` reads.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mpsearch.core import MpsearchError
from mpsearch.core.options import Option, parse_option
from mpsearch.quant.gptq import covers, token_rows
from mpsearch.quant.quantizer import Quantizer

LOG = logging.getLogger("mpsearch")
CHUNK_SIZE_KEY, CHUNK_COUNT_KEY, DATASETS_KEY = "imatrix.chunk_size", "imatrix.chunk_count", "imatrix.datasets"


def _units(model) -> tuple[list, set[str]]:
    """(the units an imatrix has entries for, the matmul units it leaves to the reference path): a head tied to
    the embedding is llama.cpp's ``token_embd`` tensor, for which llama-imatrix collects nothing."""
    from mpsearch.layers import find_units

    covered, tied = [], set()
    for unit in find_units(model):
        if not covers(unit):
            continue
        if any(isinstance(model.get_submodule(a), torch.nn.Embedding) for a in unit.aliases):
            tied.add(unit.name)
        else:
            covered.append(unit)
    return covered, tied


def file_fingerprint(path: str | Path) -> str:
    return "file:" + hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def _sequence_length(batch) -> int:
    ids = batch.get("input_ids") if isinstance(batch, dict) else batch
    return int(ids.shape[-1]) if isinstance(ids, torch.Tensor) and ids.dim() >= 2 else 0


class Imatrix(Quantizer):
    """See the module docstring. ``sums``/``counts``: per unit name, the float32 sum of squared inputs per
    column and the number of tokens summed."""

    name = "imatrix"
    _parameter_constraints = {"progress": [bool]}

    def __init__(self, model: torch.nn.Module, batches: list, progress: bool = True):
        from mpsearch.data import as_batches, data_fingerprint

        self.progress = progress
        self.validate_params()
        batches = as_batches(batches)
        self._calibration = data_fingerprint(batches)
        self._file = None
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        units, self.absent = _units(model)  # absent: matmul units without an entry (the reference path)
        self.tokens_per_chunk = 0
        self._collect(model, batches, units)

    def get_params(self) -> dict:
        return {"progress": self.progress}

    def _collect(self, model, batches: list, units: list) -> None:
        from mpsearch.outputs import attention_mask, evaluating, hooked, raw_call

        mask: list = [None]
        sums: dict[str, torch.Tensor] = {}

        def hook(name: str):
            def fn(mod, inputs, output):
                x = token_rows(inputs[0].detach(), mask[0]).double()
                sums[name] = sums.get(name, 0) + (x * x).sum(0)
                self.counts[name] = self.counts.get(name, 0) + x.shape[0]

            return fn

        quiet = not self.progress
        with hooked(u.module.register_forward_hook(hook(u.name)) for u in units), evaluating(model), torch.no_grad():
            for batch in tqdm(batches, desc="imatrix", disable=quiet or len(batches) < 2, leave=False):
                m = attention_mask(batch)
                mask[0] = m.bool() if isinstance(m, torch.Tensor) and m.dim() == 2 else None
                raw_call(model, batch)
                if not self.tokens_per_chunk:  # llama-imatrix's chunk: one sequence of the batch
                    self.tokens_per_chunk = _sequence_length(batch)
        self.sums = {k: v.float().cpu() for k, v in sums.items()}

    # -- as a quantizer ------------------------------------------------------------------------------------
    @classmethod
    def supports(cls, option: Option) -> bool:
        return option.runtime == "llama.cpp"

    @classmethod
    def check_options(cls, options) -> None:
        bad = [o.name for o in options if not cls.supports(o)]
        if bad:
            raise MpsearchError(
                f"quantizer 'imatrix' quantizes llama.cpp types only, not {', '.join(bad)}",
                "search with --target llama.cpp (or another quantizer for other options)",
            )

    def takes(self, unit, option: Option) -> bool:
        """As ``Quantizer.takes``; a unit without an entry (embeddings) cannot take a type ggml makes only
        with one (iq2_xs: llama-quantize would abort on it)."""
        from mpsearch.quant.iquants_grid import NEEDS_IMATRIX

        if not super().takes(unit, option):
            return False
        return option.name not in NEEDS_IMATRIX or self.importance(unit) is not None

    def importance(self, unit) -> torch.Tensor | None:
        """The unit's imatrix entry (in,) float32 as llama-quantize computes it (``in_sum2 / count``), or None
        for a unit it does not cover (embeddings: the reference path)."""
        if unit.name not in self.sums:
            if covers(unit) and unit.name not in self.absent:
                raise MpsearchError(
                    f"quantizer 'imatrix' has no entry for layer {unit.name!r} (it was made for another model, or "
                    "the layer was renamed)",
                    "build the imatrix on this very model, or pass the imatrix file made for it",
                )
            return None
        s = self.sums[unit.name]
        if s.shape[0] != unit.weight[0].numel():
            raise MpsearchError(
                f"the imatrix entry of layer {unit.name!r} has {s.shape[0]} columns, its weight "
                f"{unit.weight[0].numel()}",
                "pass the imatrix file made for this model",
            )
        count = float(self.counts[unit.name])
        return s / count if count > 0 else torch.ones_like(s)

    def quantize(self, unit, option: Option | str) -> torch.Tensor:
        from mpsearch.runtimes import runtime_of

        option = parse_option(option) if isinstance(option, str) else option
        if not self.supports(option):
            self.check_options([option])
        return runtime_of(option).quantize(unit.weight, option, imatrix=self.importance(unit))

    def calibration(self) -> str | None:
        return self._calibration

    def params(self) -> dict:
        return {} if self._file is None else {"file": self._file}

    def spec(self) -> dict:
        return self.spec_of(self.params(), self._calibration)

    @classmethod
    def spec_of(cls, params: dict, calibration: str | None) -> dict:
        """The spec of an imatrix with ``params`` from data of that fingerprint (the cache looks it up by
        this); embeddings take the reference path, part of the definition."""
        return {"name": cls.name, "params": params, "calibration": calibration, "other_layers": "ref"}

    # -- state and llama.cpp's file ------------------------------------------------------------------------
    def state(self) -> dict:
        return {
            "spec": self.spec(),
            "sums": self.sums,
            "counts": self.counts,
            "chunk": self.tokens_per_chunk,
            "absent": sorted(self.absent),
        }

    @classmethod
    def from_state(cls, state: dict, progress: bool = True) -> Imatrix:
        self = cls.__new__(cls)
        self.progress = progress
        self._calibration = state["spec"]["calibration"]
        self._file = state["spec"]["params"].get("file")
        self.sums, self.counts = dict(state["sums"]), {k: int(v) for k, v in state["counts"].items()}
        self.tokens_per_chunk = int(state.get("chunk", 0))
        self.absent = set(state.get("absent", ()))
        return self

    def save_gguf(self, path: str | Path, model, arch: str = "llama", datasets: tuple[str, ...] = ("mpsearch",)):
        """Write llama.cpp's imatrix GGUF: per covered unit, ``<GGUF tensor>.in_sum2`` (1 x in, f32) and
        ``<GGUF tensor>.counts`` (1 x 1, f32), plus ``imatrix.datasets``/``chunk_count``/``chunk_size``."""
        import gguf
        import numpy as np

        from mpsearch.runtimes.llama_cpp import gguf_name

        writer = gguf.GGUFWriter(str(path), arch=arch)
        writer.add_type("imatrix")
        chunk = self.tokens_per_chunk or max(self.counts.values(), default=1)
        writer.add_array(DATASETS_KEY, list(datasets))
        writer.add_uint32(CHUNK_COUNT_KEY, max(self.counts.values(), default=0) // max(chunk, 1))
        writer.add_uint32(CHUNK_SIZE_KEY, chunk)
        names = {}
        for unit_name, s in self.sums.items():
            tensor = gguf_name(unit_name, arch)
            if tensor in names:  # one GGUF tensor per unit: llama-quantize would read one entry for both
                raise MpsearchError(
                    f"units {names[tensor]!r} and {unit_name!r} both map to GGUF tensor {tensor!r} for "
                    f"architecture {arch!r}, so the imatrix file cannot hold both",
                    "pass the --arch of the GGUF the imatrix is for, or rename one module",
                )
            names[tensor] = unit_name
            writer.add_tensor(f"{tensor}.in_sum2", s.numpy().astype(np.float32).reshape(1, -1))
            writer.add_tensor(f"{tensor}.counts", np.array([[self.counts[unit_name]]], dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    @classmethod
    def from_gguf(cls, path: str | Path, model, arch: str | None = None, progress: bool = True) -> Imatrix:
        """The imatrix in llama.cpp's GGUF file ``path`` (``llama-imatrix -o``), keyed by ``model``'s units
        (their GGUF tensor names by ``arch``, default the model's ``config.model_type``)."""
        import gguf

        from mpsearch.runtimes.llama_cpp import gguf_name

        path = Path(path)
        if not path.is_file():
            raise MpsearchError(f"imatrix file {path} does not exist", "pass the file llama-imatrix wrote (-o)")
        try:
            reader = gguf.GGUFReader(str(path))
        except Exception as err:  # noqa: BLE001 - any unreadable file gets the same one-line answer
            raise MpsearchError(
                f"{path} is not an imatrix GGUF ({type(err).__name__}: {err})",
                "pass the .gguf file written by a recent llama-imatrix (convert a legacy .dat with llama-imatrix "
                "--in-file old.dat -o new.gguf)",
            ) from None
        tensors = {t.name: t for t in reader.tensors}
        arch = arch or getattr(getattr(model, "config", None), "model_type", None) or "llama"
        self = cls.__new__(cls)
        self.progress = progress
        self._calibration, self._file = None, file_fingerprint(path)
        self.sums, self.counts = {}, {}
        chunk = reader.fields.get(CHUNK_SIZE_KEY)
        self.tokens_per_chunk = int(chunk.parts[chunk.data[0]][0]) if chunk is not None else 0
        units, self.absent = _units(model)
        tied = set(self.absent)
        for unit in units:
            tensor = gguf_name(unit.name, arch)
            sums, counts = tensors.get(f"{tensor}.in_sum2"), tensors.get(f"{tensor}.counts")
            if sums is None or counts is None:  # llama-imatrix leaves output.weight out unless --process-output
                self.absent.add(unit.name)
                continue
            self.sums[unit.name] = torch.from_numpy(sums.data.reshape(-1).astype("float32").copy())
            self.counts[unit.name] = int(round(float(counts.data.reshape(-1)[0])))
        if self.absent - tied:
            LOG.warning(
                "mpsearch: imatrix %s has no entry for %d layer(s) (%s): they are quantized without one, as "
                "llama-quantize does", path, len(self.absent - tied), ", ".join(sorted(self.absent - tied)[:3]),
            )  # fmt: skip
        if not self.sums:
            raise MpsearchError(
                f"imatrix {path} has no entry for any layer of this model (by its {arch!r} GGUF tensor names)",
                "pass the imatrix llama-imatrix made for this model",
            )
        return self
