"""llama.cpp's own recipes against mpsearch's plans, inside llama.cpp: every GGUF made, then scored by the real
``llama-perplexity`` on the same held-out text.

Phases (``--phases``, default all; rows are appended to ``OUT/results.jsonl`` and a rerun skips the rows already
there, so an interrupted run resumes):
- ``speed``: one 4096 x 14336 tensor (an 8B model's FFN) through every legacy and k-quant type plus IQ4_XS,
  without and with an importance matrix, on the CPU (and on CUDA when there is one);
- ``table``: the llama.cpp-target cost table of the model, against the table of mpsearch's int options (RTN),
  both measured in this process (the target: at most 1.5x);
- ``recipes``: ``llama-quantize`` of the model's f32 copy with each recipe (Q2_K ... Q8_0, the i-quants), each
  without and with ``llama-imatrix``'s importance matrix of the calibration text (IQ3_XXS, IQ2_S and IQ2_XS with
  it only: llama-quantize refuses them without one), and the small variants size-conscious users make
  (``--token-embedding-type`` below Q8_0);
- ``plans``: one llama.cpp-target table with mpsearch's imatrix (the calibration text's), solved at each recipe's
  bits per weight and at 3.0, 3.5, 4.0, 4.5, with every type and without the grid i-quants (IQ3_S ... IQ2_XS:
  what they buy), each plan written by ``mpsearch quantize`` (GGUF + imatrix) and scored by llama-perplexity.
Bits per weight are over the 2-D weight tensors (what mpsearch plans; the tied embedding once). The zoo model's
weights were stored as Q4_1 (token_embd Q8_0): requantizing to those types is nearly lossless, so above ~5 bpw
this model cannot tell good quantization from recovering its source format; the rows below 5 bpw are the ones
that compare quantizers. ``--plot``: perplexity vs bits per weight.

    python experiments/bench_llamacpp.py --bin "$(experiments/build_llamacpp.sh)" --out experiments/results/llamacpp
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from llamacpp_tools import emit, f32_copy, imatrix, llama_build, llama_chunks, perplexity, run, tensors  # noqa: E402

RECIPES = ["Q8_0", "Q6_K", "Q5_K_M", "Q5_0", "Q4_K_M", "Q4_K_S", "Q4_0", "IQ4_NL", "IQ4_XS", "Q3_K_M", "Q3_K_S", "Q2_K",
           "IQ3_S", "IQ3_XXS", "IQ2_S", "IQ2_XS"]  # fmt: skip
SMALL = [
    ("Q4_0", "q4_0"),
    ("Q3_K_M", "q4_0"),
    ("IQ4_XS", "iq4_nl"),
    ("Q3_K_S", "q4_0"),
    ("Q2_K", "iq4_nl"),
]  # 576-wide embd: 32-blocks
LOW_BUDGETS = [3.0, 3.5, 4.0, 4.5]
SPEED_TYPES = ["q8_0", "q6_k", "q5_k", "q5_1", "q5_0", "q4_k", "q4_1", "q4_0", "q3_k", "q2_k", "iq4_xs"]
GRID_IQ = ["iq3_s", "iq3_xxs", "iq2_s", "iq2_xs"]  # the grid i-quants (mpsearch/quant/iquants_grid.py)
QKX_TYPES = ["q5_k", "q5_1", "q4_k", "q4_1", "q2_k"]  # make_qkx*_quants: compiled on a CPU with numba
# plan set -> (quantizer, types left out): the imatrix table solved with every type and without the grid
# i-quants (what they buy), and GPTQ on llama.cpp's blocks (mpsearch.quant.gptq_gguf: the types it has a grid for)
PLAN_SETS = {"all": ("imatrix", None), "no-grid-iq": ("imatrix", GRID_IQ), "gptq": ("gptq", None)}


MEASURED = ("recipes", "plans")  # rows llama.cpp measured: comparable only with rows of the same build


class Results:
    """Rows of ``results.jsonl``, keyed so that a rerun skips what is done. With ``build`` (``llama_build``:
    llama.cpp's binaries), the rows llama.cpp measured count only when that build measured them: another build
    (e.g. native vs portable AVX2 flags) moves perplexities by up to ~0.1%, as much as some of the differences
    compared here, so its rows stay in the file but are measured again and left out of the summary and table."""

    def __init__(self, path: Path, build: str | None = None, again: frozenset[str] = frozenset()):
        self.path, self.build, self.again = path, build, again
        self.added: list[dict] = []
        self.reload()

    def reload(self) -> None:
        """Read the file again (another process may be adding rows); what this process added stays its own."""
        rows = [json.loads(line) for line in self.path.read_text().splitlines()] if self.path.exists() else []
        self.rows = [r for r in rows if self._current(r)]

    def _current(self, row: dict) -> bool:
        return self.build is None or row.get("phase") not in MEASURED or row.get("build") == self.build

    def done(self, key: str) -> dict | None:
        """The newest row of ``key``; for a row of a phase measured ``again`` (``--again``: after a change to
        mpsearch's code), only one this process added."""
        newest = next((r for r in reversed(self.rows) if r.get("key") == key), None)
        if newest is not None and newest.get("phase") in self.again and newest not in self.added:
            return None
        return newest

    def add(self, **row) -> dict:
        if self.build is not None and row.get("phase") in MEASURED:
            row["build"] = self.build
        self.rows.append(row)
        self.added.append(row)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        emit(**row)
        return row


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def weight_bpw(path: Path) -> float:
    """Bits per weight of a GGUF's 2-D weight tensors (norms and other 1-D tensors left out)."""
    ts = [t for t in tensors(path).values() if len(t.shape) == 2]
    return 8 * sum(int(t.n_bytes) for t in ts) / sum(int(t.n_elements) for t in ts)


def timed(fn, rows: torch.Tensor, *args) -> float:
    """Seconds of ``fn(rows, *args)``, rounded to 0.01, waiting for the rows' device before and after."""
    sync = torch.cuda.synchronize if rows.device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    fn(rows, *args)
    sync()
    return round(time.perf_counter() - start, 2)


def _torch_port_seconds(x: torch.Tensor, imp, names: list[str]) -> dict:
    """The baseline in this process: ``names`` (types whose search numba compiles on a CPU:
    ``mpsearch.quant.ggml_numba``, ``iquants_numba``) timed again with the torch ports (``MPSEARCH_NUMBA=0``);
    {} without numba."""
    import os

    from mpsearch.core import parse_option
    from mpsearch.quant import ggml_numba
    from mpsearch.quant.llama_cpp import quantize_rows

    if not ggml_numba.available():
        return {}
    os.environ["MPSEARCH_NUMBA"] = "0"
    ggml_numba.jit.cache_clear()
    try:
        return {name: timed(quantize_rows, x, parse_option(name), imp) for name in names}
    finally:
        del os.environ["MPSEARCH_NUMBA"]
        ggml_numba.jit.cache_clear()


def phase_speed(results: Results) -> None:
    from mpsearch.core import parse_option
    from mpsearch.quant.llama_cpp import quantize_rows

    torch.manual_seed(0)
    w = torch.randn(4096, 14336) * 0.02
    qw = torch.rand(14336) + 0.1
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        x, imp = w.to(device), qw.to(device)
        keys = {weighted: f"speed/{device}/{'imatrix' if weighted else 'reference'}" for weighted in (False, True)}
        grid_key = f"speed-grid/{device}"
        if all(results.done(k) for k in (*keys.values(), grid_key)):
            continue
        # compiling (numba, on a CPU) or loading the compiled kernels from numba's cache happens once per process
        # and installation: timed here on one row, apart from the timings
        start = time.perf_counter()
        for name in SPEED_TYPES + GRID_IQ:
            quantize_rows(x[:1], parse_option(name), imp)
        warmup = round(time.perf_counter() - start, 2)
        emit(phase="speed", device=device, warmup_s=warmup)
        for weighted in (False, True):
            key = keys[weighted]
            if results.done(key):
                continue
            seconds = {}
            for name in SPEED_TYPES:
                seconds[name] = timed(quantize_rows, x, parse_option(name), imp if weighted else None)
                emit(phase="speed", device=device, imatrix=weighted, type=name, seconds=seconds[name])
            target = 60 if device == "cpu" else 2
            total = sum(seconds.values())
            baseline = _torch_port_seconds(x, imp if weighted else None, QKX_TYPES) if device == "cpu" else {}
            results.add(key=key, phase="speed", device=device, imatrix=weighted, shape=[4096, 14336],
                        seconds=seconds, total_s=round(total, 1), target_s=target, ok=total < target,
                        numba=bool(baseline), torch_port_seconds=baseline, warmup_s=warmup,
                        threads=torch.get_num_threads(), peak_rss_mib=round(peak_rss_mib()))  # fmt: skip
        # the grid i-quants (no target: their neighbour search is the slowest work here), with an imatrix as
        # llama-quantize makes them; on a CPU on the first 256 rows, where the torch ports' baseline takes ~40 s
        # (~10 min for the whole tensor)
        if not results.done(grid_key):
            part = x if device == "cuda" else x[:256]
            seconds = {}
            for name in GRID_IQ:
                seconds[name] = timed(quantize_rows, part, parse_option(name), imp)
                emit(phase="speed-grid", device=device, type=name, seconds=seconds[name])
            per = {n: round(s / part.numel() * 1e9, 1) for n, s in seconds.items()}
            baseline = _torch_port_seconds(part, imp, GRID_IQ) if device == "cpu" else {}
            results.add(key=grid_key, phase="speed", device=device, imatrix=True, shape=list(part.shape),
                        seconds=seconds, ns_per_weight=per, numba=bool(baseline), torch_port_seconds=baseline,
                        threads=torch.get_num_threads(),
                        peak_rss_mib=round(peak_rss_mib()))  # fmt: skip


def phase_table(results: Results, model, calib) -> None:
    import mpsearch
    from mpsearch.core import parse_option
    from mpsearch.quant.quantizer import RTN
    from mpsearch.runtimes.llama_cpp import LlamaCpp

    types = [o for o in LlamaCpp.default_options if RTN.supports(parse_option(o))]  # what the target searches
    key = f"table/{len(types)}types"  # the earlier row, "table", had the twelve types before the grid i-quants
    if results.done(key):
        return
    times = {}
    for label, target in (("rtn int options", None), ("llama.cpp", "llama.cpp")):
        start = time.perf_counter()
        mpsearch.estimate(model, calib, target=target, cache=False)
        times[label] = round(time.perf_counter() - start, 1)
        emit(phase="table", table=label, seconds=times[label])
    ratio = times["llama.cpp"] / times["rtn int options"]
    results.add(key=key, phase="table", types=types, calibration_sequences=len(calib),
                tokens_each=calib[0]["input_ids"].shape[-1], seconds=times, ratio=round(ratio, 2), target=1.5,
                ok=ratio <= 1.5)  # fmt: skip


def phase_recipes(results: Results, binary: Path, f32: Path, work: Path, texts: dict, args) -> None:
    from mpsearch.runtimes.llama_cpp import IMATRIX_ONLY

    their_im = imatrix(binary, f32, texts["calib"], args.ctx, args.calib_chunks, work / "llama-imatrix.gguf")
    # llama-quantize refuses the imatrix-only types without one: those recipes are made with it only
    jobs = [(r, None, im) for r in RECIPES for im in (False, True) if im or r.lower() not in IMATRIX_ONLY]
    jobs += [(r, e, True) for r, e in SMALL]
    for recipe, embedding, weighted in jobs:
        key = f"recipe/{recipe}/{embedding or 'default'}/{'imatrix' if weighted else 'plain'}"
        if results.done(key):
            continue
        out = work / (key.replace("/", "-") + ".gguf")
        cmd = [str(binary / "llama-quantize")]
        if weighted:
            cmd += ["--imatrix", str(their_im)]
        if embedding:
            cmd += ["--token-embedding-type", embedding]
        run([*cmd, str(f32), str(out), recipe, "2"])
        ppl = perplexity(binary, out, texts["eval"], args.ctx, args.chunks)
        results.add(key=key, phase="recipes", recipe=recipe, token_embedding=embedding, imatrix=weighted,
                    bpw=round(weight_bpw(out), 4), perplexity=ppl)  # fmt: skip
        out.unlink()


def phase_plans(results: Results, binary: Path, source: Path, model, calib, work: Path, texts: dict, args) -> None:
    import mpsearch
    from mpsearch.core import CostTable
    from mpsearch.quant.gptq import GPTQ
    from mpsearch.quant.imatrix import Imatrix

    sets = args.plan_sets.split(",")

    def todo() -> list[tuple[str, float]]:  # the recipes phase may still be adding rows (run in another process)
        results.reload()
        recipe_bpw = {r["bpw"] for r in results.rows if r.get("phase") == "recipes" and r["recipe"] != "F32"}
        budgets = sorted(set(LOW_BUDGETS) | recipe_bpw)
        return [(s, b) for b in budgets for s in sets if not results.done(f"plan/{s}/{b:.4f}")]  # small first

    built: dict[str, tuple] = {}  # quantizer name -> (quantizer, its llama.cpp-target table), made when first needed

    def table_of(plan_set: str):
        kind, left_out = PLAN_SETS[plan_set]
        if kind not in built:
            start = time.perf_counter()
            quantizer = Imatrix(model, calib) if kind == "imatrix" else GPTQ(model, calib)
            table = mpsearch.estimate(model, calib, target="llama.cpp", quantizer=quantizer, estimator=args.estimator)
            emit(phase="plans", step="table", quantizer=kind, seconds=round(time.perf_counter() - start, 1),
                 estimator=args.estimator)  # fmt: skip
            built[kind] = (quantizer, table)
        quantizer, table = built[kind]
        return quantizer, table if left_out is None else CostTable(table.frame[~table.frame.option.isin(left_out)],
                                                                   table.meta)  # fmt: skip

    while jobs := todo():
        plan_set, budget = jobs[0]
        key = f"plan/{plan_set}/{budget:.4f}"
        quantizer, table = table_of(plan_set)
        try:
            plan = mpsearch.solve(table, mpsearch.Budget(avg_bits=budget)).plan
        except mpsearch.MpsearchError as err:  # e.g. under the smallest size this model's rows allow
            results.add(key=key, phase="plans", plan_set=plan_set, budget_bpw=budget, infeasible=str(err))
            continue
        plan.provenance["quantizer"] = quantizer.spec()
        out = work / f"mpsearch-{plan_set}-{budget:.4f}.gguf"
        t0 = time.perf_counter()
        info = mpsearch.quantize(model, plan, out, source=source, quantizer=quantizer, progress=False)
        t1 = time.perf_counter()
        ppl = perplexity(binary, out, texts["eval"], args.ctx, args.chunks)
        counts: dict[str, int] = {}
        for option in plan.assignments.values():
            counts[option] = counts.get(option, 0) + 1
        results.add(key=key, phase="plans", plan_set=plan_set, quantizer=quantizer.label(), budget_bpw=budget,
                    bpw=round(weight_bpw(out), 4), perplexity=ppl, types=counts,
                    quantize_s=round(t1 - t0, 1), perplexity_s=round(time.perf_counter() - t1, 1),
                    peak_rss_mib=round(peak_rss_mib()))  # fmt: skip
        for path in [out, *map(Path, info["side_files"])]:
            path.unlink(missing_ok=True)


def summary(results: Results) -> list[dict]:
    """Per mpsearch plan: the recipes of no larger size it is measured against, and whether it wins."""
    f32 = next((r["perplexity"] for r in results.rows if r.get("key") == "f32"), None)
    recipes = [r for r in results.rows if r.get("phase") == "recipes"]
    out = []
    for plan in (r for r in results.rows if r.get("phase") == "plans" and "perplexity" in r):
        same = [r for r in recipes if r["imatrix"] and abs(r["bpw"] - plan["budget_bpw"]) < 1e-3]
        smaller = [r for r in recipes if r["bpw"] <= plan["bpw"] + 1e-9]
        best = min(smaller, key=lambda r: r["perplexity"], default=None)
        row = {"plan_set": plan["plan_set"], "bpw": plan["bpw"], "perplexity": plan["perplexity"]}
        if same:
            row["beats_same_size_imatrix_recipes"] = all(plan["perplexity"] < r["perplexity"] for r in same)
        if best is not None and f32 is not None:
            row["best_recipe_no_larger"] = f"{best['recipe']}{'+imatrix' if best['imatrix'] else ''}" + (
                f" embd {best['token_embedding']}" if best["token_embedding"] else ""
            )
            row["increase_ratio_vs_best"] = (plan["perplexity"] - f32) / (best["perplexity"] - f32)
        out.append(row)
    return out


def markdown(results: Results) -> str:
    """The README's table: each recipe size, llama.cpp without / with imatrix, and mpsearch's plan there."""
    f32 = next((r["perplexity"] for r in results.rows if r.get("key") == "f32"), float("nan"))
    recipes = [r for r in results.rows if r.get("phase") == "recipes" and r["recipe"] != "F32"]
    plans = {
        (r["plan_set"], r["budget_bpw"]): r for r in results.rows if r.get("phase") == "plans" and "perplexity" in r
    }
    lines = [
        f"| recipe | bpw | llama.cpp | + imatrix | mpsearch imatrix (bpw) | vs + imatrix (f32 {f32:.2f}) | "
        "mpsearch imatrix, no grid i-quants | mpsearch GPTQ (bpw) | GPTQ vs + imatrix |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    seen = set()
    for r in sorted(recipes, key=lambda r: -r["bpw"]):
        name = r["recipe"] + (f", token_embd {r['token_embedding']}" if r["token_embedding"] else "")
        if (name, r["imatrix"]) in seen or not r["imatrix"]:
            continue
        seen.add((name, True))
        plain = next((x for x in recipes if x["recipe"] == r["recipe"] and x["token_embedding"] ==
                      r["token_embedding"] and not x["imatrix"]), None)  # fmt: skip
        plan, fewer, gptq = (plans.get((s, r["bpw"])) for s in ("all", "no-grid-iq", "gptq"))

        def cell(p) -> str:
            return f"{p['perplexity']:.2f} ({p['bpw']:.2f})" if p else "-"

        def versus(p, recipe=r) -> str:
            if not p:
                return ""
            word = "lower" if p["perplexity"] < recipe["perplexity"] else "higher"
            return f"{word}; increase x{(p['perplexity'] - f32) / (recipe['perplexity'] - f32):.2f}"

        without = f"{plain['perplexity']:.2f}" if plain else "-"
        lines.append(f"| {name} | {r['bpw']:.2f} | {without} | {r['perplexity']:.2f} | {cell(plan)} | {versus(plan)} | "
                     f"{cell(fewer)} | {cell(gptq)} | {versus(gptq)} |")  # fmt: skip
    return "\n".join(lines)


def plot(results: Results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for weighted, marker, label in ((False, "x", "llama.cpp recipe"), (True, "o", "llama.cpp recipe + imatrix")):
        rows = [r for r in results.rows if r.get("phase") == "recipes" and r["imatrix"] == weighted and r["bpw"] < 32]
        ax.scatter([r["bpw"] for r in rows], [r["perplexity"] for r in rows], marker=marker, label=label)
        for r in rows:
            name = r["recipe"] + (f"/{r['token_embedding']}" if r["token_embedding"] else "")
            ax.annotate(name, (r["bpw"], r["perplexity"]), fontsize=6, alpha=0.7)
    lines = (
        ("all", "-s", "C3", "mpsearch plan, imatrix"),
        ("no-grid-iq", ":^", "C3", "mpsearch, imatrix, no grid i-quants"),
        ("gptq", "-D", "C2", "mpsearch plan, GPTQ on llama.cpp's blocks"),
    )
    for plan_set, style, color, label in lines:
        plans = sorted(
            (r for r in results.rows if r.get("plan_set") == plan_set and "bpw" in r), key=lambda r: r["bpw"]
        )
        ax.plot([r["bpw"] for r in plans], [r["perplexity"] for r in plans], style, color=color, label=label)
    f32 = next((r["perplexity"] for r in results.rows if r.get("key") == "f32"), None)
    if f32:
        ax.axhline(f32, color="grey", ls=":", label="f32")
    ax.set_xlabel("bits per weight (2-D weight tensors)")
    ax.set_ylabel("llama-perplexity (held-out text)")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("SmolLM2-135M (stored Q4_1): llama.cpp recipes vs mpsearch plans")
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bin", help="folder of llama-quantize, llama-perplexity, llama-imatrix (not for speed)")
    parser.add_argument("--out", required=True, help="folder for results.jsonl, the plot and the GGUFs made")
    parser.add_argument("--model", help="a GGUF (default: the zoo's SmolLM2-135M, stored Q4_1)")
    parser.add_argument("--phases", default="speed,table,recipes,plans")
    parser.add_argument("--ctx", type=int, default=256)
    parser.add_argument("--chunks", type=int, default=32, help="llama-perplexity chunks of the evaluation text")
    parser.add_argument("--calib-chunks", type=int, default=16, help="calibration chunks (imatrix, table)")
    parser.add_argument("--estimator", default="fisher")
    parser.add_argument("--plan-sets", default=",".join(PLAN_SETS), help=f"plans made (of {', '.join(PLAN_SETS)})")
    parser.add_argument(
        "--again",
        default="",
        help="phases measured anew though their rows exist (e.g. speed,table,plans after a change to mpsearch's "
        "code); the newest row of a key counts",
    )
    args = parser.parse_args()
    phases = set(args.phases.split(","))
    again = frozenset(filter(None, args.again.split(",")))

    from mpsearch.models.smollm2 import gguf_path
    from mpsearch.models.sources import corpus_sentences

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if "speed" in phases:
        phase_speed(Results(out / "results.jsonl", again=again))
    if not phases - {"speed"}:
        return 0
    if not args.bin:
        parser.error("--bin is needed for the phases table, recipes and plans")
    binary, source = Path(args.bin), Path(args.model or gguf_path())
    results = Results(out / "results.jsonl", llama_build(binary), again)
    emit(phase="setup", llama_build=results.build)
    work = out / "work"
    work.mkdir(exist_ok=True)
    sentences = corpus_sentences()
    texts = {"calib": work / "calib.txt", "eval": work / "eval.txt"}
    texts["calib"].write_text("\n".join(sentences[:1500]))
    texts["eval"].write_text("\n".join(sentences[-1500:]))
    f32 = f32_copy(binary, source, work / "f32.gguf")
    if not results.done("f32"):
        results.add(key="f32", phase="recipes", recipe="F32", token_embedding=None, imatrix=False, bpw=32.0,
                    perplexity=perplexity(binary, f32, texts["eval"], args.ctx, args.chunks))  # fmt: skip
    if phases & {"table", "plans"}:
        from mpsearch.models.local import load_local

        model = load_local(str(source), None).model
        calib = [{"input_ids": row[None]} for row in llama_chunks(source, texts["calib"].read_text(), args.ctx,
                                                                    args.calib_chunks)]  # fmt: skip
    if "table" in phases:
        phase_table(results, model, calib)
    if "recipes" in phases:
        phase_recipes(results, binary, f32, work, texts, args)
    if "plans" in phases:
        phase_plans(results, binary, source, model, calib, work, texts, args)
    for row in summary(results):
        emit(phase="summary", **row)
    plot(results, out / "perplexity_vs_bpw.png")
    (out / "table.md").write_text(markdown(results) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
