"""Command line: ``mpsearch search``, ``evaluate``, ``pareto``, ``batch``, ``export`` and ``quantize``.

Bad input prints one line ``mpsearch: error: <what>; <fix>`` to stderr and exits with code 2.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
from tqdm.auto import tqdm

from mpsearch.core import DEFAULT_OPTIONS, MpsearchError
from mpsearch.names import TARGET_NAMES


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, no usage dump
        raise MpsearchError(message, f"see `{self.prog} --help`")


def _status(message: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(message, file=sys.stderr)


def _options(text: str | None) -> list[str] | None:
    """Comma-separated option names (None: the model's default options)."""
    from mpsearch.core import parse_options

    if text is None:
        return None
    names = [t.strip() for t in text.split(",") if t.strip()]
    parse_options(names)
    return names


def _patterns(text: str | None) -> list[str] | None:
    return None if text is None else [t.strip() for t in text.split(",") if t.strip()]


def _params(text: str | None, flag: str) -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise MpsearchError(
            f"{flag} is not valid JSON ({exc.msg})", f"""write e.g. {flag} '{{"max_probes": 4}}'"""
        ) from None
    if not isinstance(value, dict):
        raise MpsearchError(f"{flag} must be a JSON object", f"""write e.g. {flag} '{{"max_probes": 4}}'""")
    return value


def _load(args, text: bool = True):
    """The model ``--model`` names, with its data: a zoo model, or your own (a transformers folder, a .gguf
    file, module:function, a hub id in the local cache) with batches from ``--calib``/``--eval`` text files."""
    from mpsearch.models import ZOO, load, resolve_device
    from mpsearch.models.local import TextSpec, is_local, load_local, source_of

    name, device = args.model, args.device
    if name in ZOO:  # unknown names (and devices) fail before any status line
        if getattr(args, "calib", None):
            raise MpsearchError(f"--calib is for your own model; {name} brings its own data", "leave --calib out")
        _status(f"loading {name} on {resolve_device(device)} ...")
        return load(name, device=device)
    if not is_local(name):
        return load(name, device=device)  # the zoo's one-line error, naming its models
    source_of(name)  # a path that cannot be a model fails before anything else
    spec = None
    if args.calib:
        spec = TextSpec(
            args.calib, args.eval, args.seq_len, args.n_calib, args.n_eval, args.batch_size, args.eval_split
        )
    elif text:
        raise MpsearchError(f"model {name} needs calibration text", "pass --calib FILE (plain text or JSONL 'text')")
    _status(f"loading {name} on {resolve_device(device)} ...")
    return load_local(name, spec, args.dtype, device)


def _add_source(parser) -> None:
    """--model and the data options every command that loads a model takes."""
    from mpsearch.names import ZOO_NAMES

    parser.add_argument(
        "--model",
        required=True,
        help=f"a zoo model ({', '.join(ZOO_NAMES)}), a transformers folder, a .gguf file or module:function",
    )
    parser.add_argument("--calib", help="your model: calibration text (plain text, or JSONL with a 'text' field)")
    parser.add_argument("--eval", help="your model: evaluation text (default: the last --eval-split of --calib)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per sequence cut from the text")
    parser.add_argument("--n-calib", type=int, default=32, help="calibration sequences at most")
    parser.add_argument("--n-eval", type=int, default=32, help="evaluation sequences at most")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per batch")
    parser.add_argument("--eval-split", type=float, default=0.2, help="share of --calib held out without --eval")
    parser.add_argument("--dtype", default="auto", help="auto (the checkpoint's), bfloat16, float16 or float32")
    parser.add_argument("--device", help=DEVICE_HELP)


def _budget(args):
    from mpsearch.core import Budget

    return Budget(avg_bits=args.avg_bits, size_bytes=args.size_bytes, bops=args.bops)


def cmd_search(args) -> int:
    from mpsearch import api

    options = _options(args.options)
    budget = _budget(args)  # validate before the slow part
    solver_params = _params(args.solver_params, "--solver-params")
    if args.solver == "evolutionary":
        solver_params.setdefault("n_trials", args.trials)
        solver_params.setdefault("resume", args.resume)
        solver_params.setdefault("progress", True)  # a bar over the trials, each a pass on the real model
    estimator_params = _params(args.estimator_params, "--estimator-params")
    from mpsearch.models import resolve_device

    resolve_device(args.device)
    _target_options(args.target, options)
    api.check_refine(args.refine)
    # wrong names or values fail before the model is loaded
    api.search_components(args.estimator, args.solver, estimator_params, solver_params)
    from mpsearch.models import ZOO

    source: dict = {"model": args.model, "device": args.device}
    quantizer = args.quantizer
    if args.imatrix and args.quantizer not in ("rtn", "imatrix"):
        raise MpsearchError(f"--imatrix is a quantizer and so is --quantizer {args.quantizer}", "pass one of them")
    if args.model not in ZOO:  # your own model: loaded here with its text, then searched where it lives
        zoo = _load(args)
        source = {"model": zoo.model, "data": zoo.calibration, "loss_fn": zoo.loss}
        quantizer = _imatrix_file(args, zoo.model) or quantizer
    elif args.imatrix:
        raise MpsearchError(f"--imatrix is for your own model; {args.model} is a zoo name", "use --quantizer imatrix")
    _status(f"searching {args.model} with {args.estimator} + {args.solver} ...")
    result = api.search(
        **source,
        budget=budget,
        estimator=args.estimator,
        solver=args.solver,
        options=options,
        include=_patterns(args.include),
        exclude=_patterns(args.exclude),
        estimator_params=estimator_params,
        solver_params=solver_params,
        target=args.target,
        safe=not args.no_safe,
        refine=args.refine,
        quantizer=quantizer,
    )
    table = result.extra["table"]
    table.meta["model"] = result.plan.provenance["model"] = args.model  # the name evaluate checks the plan by
    frame = result.plan.to_frame(table)[["layer", "option", "bits", "n_params", "damage"]]
    with __import__("pandas").option_context("display.max_rows", None, "display.width", 200):
        print(frame.to_string(index=False))
    if "study" in result.extra:
        _status(f"evolutionary study {result.extra['study_name']}: {result.extra['study']}")
    if "safety" in result.extra:
        _status(_safety_line(result.extra["safety"]))
    print(json.dumps({"model": args.model, **result.summary(), "safety": result.extra.get("safety")}))
    if args.out:
        _write(args.out, result.plan.save)
        _status(f"plan written to {args.out}")
    if args.table:
        _write(args.table, table.to_parquet)
        _status(f"cost table written to {args.table}")
    return 0


def _imatrix_file(args, model):
    """--imatrix FILE as the quantizer (None without it)."""
    if not getattr(args, "imatrix", None):
        return None
    from mpsearch.quant.imatrix import Imatrix

    return Imatrix.from_gguf(args.imatrix, model)


def _safety_line(safety: dict) -> str:
    """One line: the measured held-out losses behind the plan returned."""
    uniform = ", ".join(f"{o} {v:.4g}" for o, v in safety["uniform_losses"].items()) or "none within the budget"
    split = "held-out" if safety["held_out"] else "calibration (too little data to hold any out)"
    return (
        f"measured on the {split} split (loss, lower is better): searched {safety['searched_loss']:.4g}, "
        f"refined {safety['refined_loss']:.4g} ({safety['refine_moves']} moves kept of "
        f"{safety['refine_evals']} tried); uniform: {uniform}; returned: {safety['chosen']}"
    )


def cmd_evaluate(args) -> int:
    from mpsearch import api
    from mpsearch.core import BitPlan
    from mpsearch.layers import discover
    from mpsearch.quant.quantizer import for_plan
    from mpsearch.runtimes.inputs import unrounded

    plan = BitPlan.load(args.plan)
    _check_plan_model(plan, args.plan, args.model)
    plain = unrounded(plan) if args.runtime_inputs else []
    if plain:
        raise MpsearchError(
            f"--runtime-inputs rounds each layer's input as the plan's runtime does, and this plan holds "
            f"{', '.join(plain)}, whose runtime rounds none",
            "use it for plans searched with --target llama.cpp",
        )
    zoo = _load(args)
    shapes = {info.name: info.shape for info in discover(zoo.model)[0]}
    plan.check_layers(list(shapes), f"model {args.model!r}", require_all=False)  # --exclude: layers left out
    # the quantizer the plan was searched with, rebuilt exactly from its spec (the search's calibration split)
    q = for_plan(zoo.model, plan, _imatrix_file(args, zoo.model), zoo.calibration, "evaluate")
    quantizer = q.label()
    _status(f"measuring the planned model ({quantizer}) ...")
    rounding = api.searched_inputs(plan, args.runtime_inputs)
    measured = api.evaluate(
        zoo.model, plan, zoo.evaluation, zoo.loss, quantizer=q, uniform=False, runtime_inputs=rounding
    )
    options = plan.provenance.get("options") or list(zoo.options)
    uniform_option, uniform = api.best_uniform(
        zoo.model, plan, zoo.evaluation, options, zoo.loss, quantizer=q, size=measured["avg_bits"], status=_status,
        runtime_inputs=rounding,
    )  # fmt: skip
    line = {
        "model": args.model,
        "avg_bits": measured["avg_bits"],
        "size_bytes": measured["size_bytes"],
        "metric_name": measured["metric_name"],
        "metric": measured["metric"],
        "higher_is_better": measured["higher_is_better"],
        "uniform_option": uniform_option,
        "uniform_avg_bits": uniform["avg_bits"] if uniform else None,
        "uniform_metric": uniform["metric"] if uniform else None,
        "quantizer": quantizer,
        "runtime_inputs": rounding,
    }
    if "perplexity_fp" in measured:
        line["perplexity_fp"] = measured["perplexity_fp"]
    print(json.dumps(line))
    return 0


def _check_plan_model(plan, plan_path: str, model: str) -> None:
    """Refuse a plan searched on another model (paths compared resolved)."""
    from pathlib import Path

    from mpsearch.core import InvalidPlanError

    made_for = plan.provenance.get("model")

    def same(a: str, b: str) -> bool:
        return a == b or (Path(a).exists() and Path(b).exists() and Path(a).resolve() == Path(b).resolve())

    if made_for and not same(made_for, model):
        raise InvalidPlanError(
            f"plan {plan_path} was made for model {made_for!r}, not {model!r}",
            f"use --model {made_for} or search a plan for {model}",
        )


def _check_writer_source(runtime, path: str | None, args) -> None:
    """llama.cpp writes from a GGUF (the model's, or --gguf), torchao and HQQ from a transformers folder."""
    is_gguf = (path or "").endswith(".gguf")
    if runtime.writes_file and not is_gguf and not args.gguf:
        raise MpsearchError(
            f"llama.cpp files are written from a GGUF, and {args.model} is not one",
            "make an F16 GGUF of it with llama.cpp's convert_hf_to_gguf.py (python convert_hf_to_gguf.py DIR "
            "--outtype f16) and pass it as --gguf",
        )
    if not runtime.writes_file and (path is None or is_gguf):
        raise MpsearchError(
            f"{runtime.name} models are written from a transformers folder, and {args.model} is not one",
            "pass --model the checkpoint folder (config.json + safetensors) the plan was searched on",
        )


def cmd_quantize(args) -> int:
    from mpsearch.artifacts import check_output, quantize
    from mpsearch.core import BitPlan
    from mpsearch.models.local import is_local, source_of
    from mpsearch.runtimes import get_runtime

    plan = BitPlan.load(args.plan)
    _check_plan_model(plan, args.plan, args.model)
    runtime = get_runtime(plan.provenance.get("runtime") or "mpsearch")
    runtime.check(plan)
    check_output(__import__("pathlib").Path(args.out), runtime)
    local = is_local(args.model)
    if local:  # a wrong kind of source fails before the model loads
        _check_writer_source(runtime, args.model if source_of(args.model)[0] in ("gguf", "folder") else None, args)
    zoo = _load(args, text=False)
    if not local:
        _check_writer_source(runtime, zoo.path, args)
    source = args.gguf or zoo.path
    _status(f"writing {args.out} for {runtime.name} ...")
    info = quantize(
        zoo.model,
        plan,
        args.out,
        source=source,
        quantizer=_imatrix_file(args, zoo.model),
        calibration=zoo.calibration or None,  # a GPTQ or imatrix plan's quantizer is rebuilt on it when not cached
        progress=True,
    )
    _status(
        f"wrote {info['path']}: {info['file_bytes'] / 2**20:.1f} MiB on disk; planned weights "
        f"{info['tensor_bytes']} bytes, {info['bits_per_weight']:.4f} bits per weight (the search charged "
        f"{info['charged_bytes']} bytes, {info['charged_bits_per_weight']:.4f})"
    )
    for extra in info["side_files"]:
        _status(f"also wrote {extra}")
    if "note" in info:
        _status(f"note: {info['note']}")
    print(json.dumps({"model": args.model, **info}))
    return 0


def cmd_pareto(args) -> int:
    from mpsearch import api

    options = _options(args.options)
    if not args.out and not args.plot:
        raise MpsearchError(
            "pareto writes nothing without --out or --plot", "pass --out front.csv and/or --plot front.png"
        )
    options = _target_options(args.target, options)
    if args.measure < 0:
        raise MpsearchError(f"--measure {args.measure} is negative", "pass the number of points to measure, >= 0")
    if args.plot:
        _check_plot_path(args.plot)
    zoo = _load(args)
    _status(f"estimating sensitivities ({args.estimator}) ...")
    table = api.estimate(
        zoo.model,
        zoo.calibration,
        args.estimator,
        options or zoo.options,
        zoo.loss,
        include=_patterns(args.include),
        exclude=_patterns(args.exclude),
        estimator_params=_params(args.estimator_params, "--estimator-params"),
    )
    table.meta["model"] = args.model
    front = api.pareto(zoo.model, table=table, axis=args.axis, budgets=args.budgets)
    frame = front.to_frame()
    if args.measure:
        picks = sorted({int(round(i)) for i in np.linspace(0, len(frame) - 1, min(args.measure, len(frame)))})
        frame["metric"] = np.nan
        for i in tqdm(picks, desc="measuring front points", file=sys.stderr):
            frame.loc[i, "metric"] = api.evaluate(zoo.model, front.plans[i], zoo.evaluation, zoo.loss, uniform=False)[
                "metric"
            ]
        frame["metric_name"] = zoo.metric_name
    if args.out:
        _write(args.out, lambda path: frame.to_csv(path, index=False))
        _status(f"front ({len(frame)} points) written to {args.out}")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2 if args.measure else 1, figsize=(12 if args.measure else 7, 4.5), squeeze=False)
        front.plot(ax=axes[0][0], axis=args.axis)
        axes[0][0].set_title(f"{args.model}: predicted damage ({args.estimator})")
        if args.measure:
            measured = frame.dropna(subset=["metric"])
            ax = axes[0][1]
            ax.plot(measured[args.axis], measured["metric"], "o-", label="searched plans (measured)")
            ax.set_xlabel(args.axis)
            ax.set_ylabel(f"{frame['metric_name'].iloc[0]} (held-out, higher is better)")
            ax.set_title("measured quality at selected points")
            ax.legend()
        fig.tight_layout()
        _write(args.plot, lambda path: fig.savefig(path, dpi=120))
        _status(f"plot written to {args.plot}")
    print(json.dumps({"model": args.model, "estimator": args.estimator, "points": len(frame), "axis": args.axis}))
    return 0


def cmd_batch(args) -> int:
    from mpsearch.batch import BatchConfig, run_batch

    config = BatchConfig.load(args.config)
    if args.run_dir:
        config.run_dir = __import__("pathlib").Path(args.run_dir)
    results = run_batch(config)
    _status(f"{len(results)} cells in {config.run_dir} (results.csv, results.parquet, summary.png)")
    print(json.dumps({"run_dir": str(config.run_dir), "cells": len(results)}))
    return 0


def _write(path: str, writer) -> None:
    """``writer(path)``; a file-system fault (missing folder, a folder in the way, read-only, disk full) is one
    line naming the path instead of a traceback."""
    try:
        writer(path)
    except OSError as err:
        raise MpsearchError(
            f"cannot write {path}: {err.strerror or type(err).__name__}",
            "pass a path in an existing, writable folder with free space",
        ) from None


def _check_plot_path(path: str) -> None:
    """The plot's format comes from its extension: refuse one matplotlib cannot write before any work."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    suffix = __import__("pathlib").Path(path).suffix.lstrip(".").lower()
    if suffix not in formats:
        raise MpsearchError(
            f"--plot {path}: cannot write a {suffix or 'file without an extension'!r} image",
            f"end the name with one of {', '.join('.' + f for f in sorted(formats))}",
        )


def _target_options(target: str | None, options: list[str] | None) -> list[str] | None:
    """The options searched for ``--target`` (its defaults, or --options named in its family)."""
    if target is None:
        return options
    from mpsearch.runtimes import get_runtime

    return get_runtime(target).resolve(options)


def cmd_export(args) -> int:
    from mpsearch.core import BitPlan
    from mpsearch.export import export

    if args.target and args.format and args.target != args.format:
        raise MpsearchError(
            f"--target {args.target} and --format {args.format} contradict each other", "pass only --target"
        )
    plan = BitPlan.load(args.plan)
    target = args.target or args.format or plan.provenance.get("runtime")  # default: the runtime searched for
    if target is None:
        raise MpsearchError(
            "export needs --target (the plan records no runtime)", f"pass --target {' or '.join(TARGET_NAMES)}"
        )
    kwargs = {"arch": args.arch} if args.arch else {}
    if args.arch and target != "llama.cpp":
        raise MpsearchError("--arch is for --target llama.cpp", "leave it out for other targets")
    text = export(plan, target, **kwargs)
    if args.out:
        _write(args.out, lambda path: __import__("pathlib").Path(path).write_text(text))
        _status(f"{target} export written to {args.out}")
    else:
        sys.stdout.write(text)
    return 0


QUANTIZER_HELP = (
    "rtn: round to nearest (default); gptq: GPTQ error feedback with the calibration inputs' Hessians, for "
    "int options; imatrix: llama.cpp types quantized with the importance matrix of the calibration text, as "
    "llama-quantize --imatrix does (the table, the check, `evaluate` and `quantize` of the plan all use it)"
)
IMATRIX_HELP = "llama.cpp: an importance matrix GGUF from llama-imatrix to quantize with (implies --quantizer imatrix)"
TARGET_HELP = (
    f"the runtime the plan is for: {', '.join(n for n in TARGET_NAMES if n != 'json')}; searches its options "
    "with its own sizes and quantization math (default: mpsearch's formats)"
)
DEVICE_HELP = "where the zoo model runs: auto (default: cuda when available, else cpu), cpu, cuda, cuda:N, mps"


def build_parser() -> argparse.ArgumentParser:
    """The parser, built from names only (``mpsearch.names``): no torch import, ``--help`` is instant."""
    from mpsearch.names import DEFAULT_ESTIMATOR, ESTIMATOR_NAMES, QUANTIZERS, SOLVER_NAMES

    parser = _Parser(prog="mpsearch", description="Mixed-precision bit-allocation search.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    s = sub.add_parser("search", help="estimate sensitivities and solve for a bit plan")
    _add_source(s)
    s.add_argument("--avg-bits", type=float, help="budget: mean effective bits per weight")
    s.add_argument("--size-bytes", type=float, help="budget: bytes of the quantized weights")
    s.add_argument("--bops", type=float, help="budget: bit operations per sample")
    s.add_argument("--estimator", default=DEFAULT_ESTIMATOR, help=f"one of {list(ESTIMATOR_NAMES)}")
    s.add_argument("--solver", default="core", help=f"one of {list(SOLVER_NAMES)} (core: the fastest exact one)")
    s.add_argument("--trials", type=int, default=100, help="evolutionary: trials on the real model")
    s.add_argument(
        "--resume",
        action="store_true",
        help="evolutionary: continue this table/budget/seed's study in the run folder (default: a fresh one)",
    )
    s.add_argument(
        "--options", help="comma-separated options (default: the model's, e.g. " + ",".join(DEFAULT_OPTIONS) + ")"
    )
    s.add_argument("--estimator-params", help="estimator parameters as JSON, e.g. '{\"max_probes\": 4}'")
    s.add_argument("--solver-params", help="solver parameters as JSON")
    s.add_argument("--include", help="comma-separated FQN patterns of layers to quantize (default: all)")
    s.add_argument("--exclude", help="comma-separated FQN patterns of layers to leave alone, e.g. lm_head")
    s.add_argument("--target", help=TARGET_HELP)
    s.add_argument(
        "--no-safe",
        action="store_true",
        help="return the solver's plan as it is (default: refine it and compare it with the uniform options "
        "within the budget on a held-out quarter of the calibration data, and return the best measured)",
    )
    s.add_argument("--refine", type=int, default=16, help="measured refinement moves to try (0: none)")
    s.add_argument("--quantizer", default="rtn", choices=list(QUANTIZERS), help=QUANTIZER_HELP)
    s.add_argument("--imatrix", help=IMATRIX_HELP)
    s.add_argument("--out", help="write the plan JSON here")
    s.add_argument("--table", help="write the cost table (Parquet) here")
    s.set_defaults(func=cmd_search)

    f = sub.add_parser("pareto", help="the predicted damage vs size front, as CSV and a plot")
    _add_source(f)
    f.add_argument("--estimator", default=DEFAULT_ESTIMATOR)
    f.add_argument("--options", help="comma-separated options (default: the model's)")
    f.add_argument("--estimator-params", help="estimator parameters as JSON")
    f.add_argument("--include", help="comma-separated FQN patterns of layers to quantize")
    f.add_argument("--exclude", help="comma-separated FQN patterns of layers to leave alone")
    f.add_argument("--axis", default="size_bytes", help="size_bytes or avg_bits")
    f.add_argument("--target", help=TARGET_HELP)
    f.add_argument("--out", help="front CSV: plan_id, cost, predicted damage (and measured metric)")
    f.add_argument("--plot", help="PNG of the front with the uniform options marked")
    f.add_argument(
        "--budgets", type=int, help="only the optima at N evenly spaced budgets plus the hull vertices (large models)"
    )
    f.add_argument(
        "--measure",
        type=int,
        nargs="?",
        const=6,
        default=0,
        help="also measure the real metric at N evenly spaced points (default 6)",
    )
    f.set_defaults(func=cmd_pareto)

    b = sub.add_parser("batch", help="run (or resume) a grid of searches from a TOML config")
    b.add_argument("config", help="e.g. experiments/configs/memory_grid.toml")
    b.add_argument("--run-dir", help="override the config's run_dir")
    b.set_defaults(func=cmd_batch)

    x = sub.add_parser("export", help="write a plan for the runtime it was searched for (--target)")
    x.add_argument("plan")
    x.add_argument("--target", help=f"{', '.join(TARGET_NAMES)} (json: any plan)")
    x.add_argument("--format", help=argparse.SUPPRESS)  # the old name of --target
    x.add_argument("--arch", help="llama.cpp: GGUF architecture (default: the plan's model type, else llama)")
    x.add_argument("--out", help="file to write (default: stdout)")
    x.set_defaults(func=cmd_export)

    e = sub.add_parser("evaluate", help="measure a plan against full precision and the uniform baseline")
    _add_source(e)
    e.add_argument("--plan", required=True, help="plan JSON from `mpsearch search --out`")
    e.add_argument("--imatrix", help="llama.cpp: the imatrix file the plan was searched with (if not cached)")
    e.add_argument("--runtime-inputs", action=argparse.BooleanOptionalAction, default=None,
                   help="llama.cpp: round each layer's input to 8 bits as its CPU backend does before a quantized "
                   "matmul, so the ratio to full precision is llama-perplexity's (default: as the plan was "
                   "searched, i.e. on when its table counted that rounding)")  # fmt: skip
    e.set_defaults(func=cmd_evaluate)

    q = sub.add_parser("quantize", help="write the file the plan's runtime loads (a GGUF, a saved model)")
    q.add_argument("plan", help="plan JSON from `mpsearch search --target ... --out`")
    _add_source(q)  # --calib: the text a GPTQ or imatrix plan was searched on, when its state is not cached
    q.add_argument("--out", required=True, help="llama.cpp: a .gguf path; torchao, hqq: a new folder")
    q.add_argument("--gguf", help="llama.cpp, for a transformers folder: its F16 GGUF (convert_hf_to_gguf.py)")
    q.add_argument("--imatrix", help="llama.cpp: the imatrix file the plan was searched with (if not cached)")
    q.set_defaults(func=cmd_quantize)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.command == "search" and args.avg_bits is None and args.size_bytes is None and args.bops is None:
            args.avg_bits = 4.0
        return args.func(args)
    except MpsearchError as exc:
        print(f"mpsearch: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mpsearch: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
