"""``quantize(model, plan, out)``: the file a runtime loads, with exactly the math that was searched.

The plan's runtime (recorded when it was searched) names its writer (``Runtime.writer``): llama.cpp writes a
``.gguf`` (plus the ``--tensor-type-file`` for ``llama-quantize``), torchao and HQQ a saved model folder. The
output appears whole or not at all: it is written beside its final path and renamed there at the end (a fault
or Ctrl-C leaves nothing half-written). The bytes written for the planned tensors are counted and compared with
what the search charged for them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from mpsearch.core import BitPlan, MpsearchError


def quantize(
    model,
    plan: BitPlan | str | os.PathLike,
    out: str | os.PathLike,
    *,
    source: str | os.PathLike | None = None,
    quantizer=None,
    calibration=None,
    dtype: str = "auto",
    device: str | None = None,
    progress: bool = True,
) -> dict:
    """Write ``plan`` applied to ``model`` as its runtime's own file at ``out``; returns what was written:
    ``path``, ``runtime``, ``file_bytes`` (on disk), ``tensor_bytes`` and ``bits_per_weight`` of the planned
    weights as stored, and what the search charged for them (``charged_bytes``, ``charged_bits_per_weight``).

    ``model``: an ``nn.Module`` or what ``--model`` takes (a transformers folder, a ``.gguf``); ``source``: the
    file the runtime's writer starts from when the model is not it (llama.cpp: the GGUF the model was loaded
    from, e.g. an F16 GGUF made by llama.cpp's ``convert_hf_to_gguf.py``; torchao/HQQ: the checkpoint folder).
    ``quantizer``/``calibration``: as for ``apply_plan`` (the plan's own math, or a one-line refusal)."""
    from mpsearch.api import plan_size
    from mpsearch.quant.apply import resolve_plan
    from mpsearch.quant.quantizer import for_plan
    from mpsearch.runtimes import get_runtime

    plan = plan if isinstance(plan, BitPlan) else BitPlan.load(plan)
    name = plan.provenance.get("runtime")
    if name is None:
        raise MpsearchError("the plan records no runtime to write a file for", "search it with --target llama.cpp")
    runtime = get_runtime(name)
    runtime.check(plan)
    out = Path(out)
    check_output(out, runtime)
    if isinstance(model, (str, os.PathLike)):
        from mpsearch.models.local import load_local, source_of

        kind, _, _ = source_of(str(model))
        source = source or (model if kind in ("gguf", "folder") else None)
        model = load_local(str(model), None, dtype, device).model
    units = resolve_plan(model, plan)
    q = for_plan(model, plan, quantizer, calibration, "quantize")
    charged = plan_size(model, plan)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        info = runtime.write(model, plan, q, tmp, source=source, progress=progress)
        extra = runtime.side_files(plan, out, q, model)
        if tmp.is_dir() and out.exists():
            out.rmdir()  # an empty folder: checked before the work
        tmp.replace(out)
    except OSError as err:
        raise MpsearchError(
            f"cannot write {out}: {err.strerror or type(err).__name__}", "pass a path in a writable folder"
        ) from None
    finally:
        _remove(tmp)
    n_params = sum(u.weight.numel() for u in units)
    stored = sum(info["tensor_bytes"].values())
    return {
        "path": str(out),
        "runtime": runtime.name,
        "file_bytes": _size_on_disk(out),
        "tensor_bytes": stored,
        "bits_per_weight": 8 * stored / n_params,
        "charged_bytes": charged["size_bytes"],
        "charged_bits_per_weight": charged["avg_bits"],
        "side_files": extra,
        **({"note": info["note"]} if "note" in info else {}),
    }


def check_output(out: Path, runtime) -> None:
    """Refuse, before any work, an output the writer could not put in place."""
    if runtime.writer is None:
        raise MpsearchError(
            f"{runtime.name} has no file writer here",
            f"write its config with `mpsearch export --target {runtime.name}`",
        )
    if runtime.writes_file and out.suffix != ".gguf":
        raise MpsearchError(f"--out {out} must end in .gguf for {runtime.name}", "pass e.g. --out model-mixed.gguf")
    if not runtime.writes_file and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MpsearchError(f"--out {out} exists and is not an empty folder", "pass a new folder's path")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise MpsearchError(f"cannot write {out}: {parent} is not a writable folder", "pass a path in one")


def require_rtn(quantizer, runtime: str) -> None:
    """Runtime files hold round-to-nearest weights (or the runtime's own quantizer's): refuse a plan searched
    with other math (GPTQ) rather than write a file that is not what was searched."""
    from mpsearch.quant.quantizer import RTN

    if not isinstance(quantizer, RTN):
        raise MpsearchError(
            f"{runtime} files are written with round to nearest (or the runtime's own quantizer); this plan was "
            f"searched with {quantizer.label()}",
            f"search the plan with --quantizer rtn for --target {runtime.lower()}",
        )


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def _size_on_disk(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
