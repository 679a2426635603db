"""Conformance checks derived from the registries (in the spirit of ``optuna.testing``).

Tests parametrize over ``estimator_instances()`` and ``solver_instances()``, which enumerate
``sensitivity.REGISTRY`` and ``solvers.REGISTRY``: a newly registered estimator or solver is checked without
anyone adding it to a list. ``CONFORMANCE_PARAMS`` only makes the slow ones quick; a registry entry without
one runs with its defaults. ``tiny_transformers()`` builds random-init transformers models (BERT, Llama with
SDPA attention, GPT-2) with padded token batches, the way users bring theirs.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

# fast settings for the conformance runs (tiny models; statistics are not the point there)
CONFORMANCE_PARAMS: dict[str, dict] = {
    "hessian": {"min_probes": 2, "max_probes": 2},
    "fisher": {"max_samples": 4, "n_targets": 2},
    "evolutionary": {"n_trials": 4, "storage": ":memory:"},
    "ilp": {"time_limit": 60},
}
ILP_BACKENDS = ("cbc", "highs", "cpsat")


def estimator_instances() -> list:
    """One instance of every registered estimator (progress bars off)."""
    import sensitivity

    out = []
    for name, cls in sensitivity.REGISTRY.items():
        params = dict(CONFORMANCE_PARAMS.get(name, {}))
        if "progress" in cls.param_names():
            params["progress"] = False
        out.append(sensitivity.get_estimator(name, **params))
    return out


def plan_hash_fitness(plan) -> float:
    """A deterministic stand-in fitness for conformance runs of solvers that measure plans."""
    text = json.dumps(sorted(plan.assignments.items()))
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) / 16**8


def solver_instances() -> list:
    """Every registered solver (each ILP backend separately), validated, with quick settings."""
    import solvers

    out = []
    for name, cls in solvers.REGISTRY.items():
        params = dict(CONFORMANCE_PARAMS.get(name, {}))
        if "fitness" in cls.param_names():
            params["fitness"] = plan_hash_fitness
        if name == "ilp":
            out += [solvers.get_solver(name, backend=b, **params) for b in ILP_BACKENDS]
        else:
            out.append(solvers.get_solver(name, **params))
    return out


def snapshot(model: nn.Module) -> dict:
    """Everything an estimator must leave as it was: weights and buffers (bytes, and the very Parameter
    objects), ``training`` flags, ``requires_grad``, gradients, module and tensor hooks and the attention
    implementation of every transformers config."""
    from mpsearch.data import hash_tensor

    state = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        h = hashlib.sha256()
        hash_tensor(h, tensor.detach())
        state[name] = h.hexdigest()
    hooks = {
        name: tuple(
            len(getattr(m, attr))
            for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
        )
        for name, m in model.named_modules()
    }
    configs = {
        name: getattr(m.config, "_attn_implementation", None)
        for name, m in model.named_modules()
        if getattr(m, "config", None) is not None
    }
    tensor_hooks = {
        name: tuple(len(getattr(p, attr) or {}) for attr in ("_backward_hooks", "_post_accumulate_grad_hooks"))
        for name, p in model.named_parameters()
    }
    return {
        "state": state,
        "parameter_ids": {name: id(p) for name, p in model.named_parameters()},
        "tensor_hooks": tensor_hooks,
        "training": {name: m.training for name, m in model.named_modules()},
        "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()},
        "grad": {name: p.grad is None for name, p in model.named_parameters()},
        "hooks": hooks,
        "attn_implementation": configs,
    }


def check_estimator(estimator, model: nn.Module, data: list, options=("int4", "int8"), **estimate_kw):
    """Run ``estimator`` and assert: a complete, finite table (one row per unit x option, a shared weight
    once) that ranks the coarse option as no better than the fine one overall, and a model left exactly as
    it was. Returns the table."""
    from mpsearch.layers import discover

    before = snapshot(model)
    table = estimator.estimate(model, data, list(options), cache=False, **estimate_kw)
    after = snapshot(model)
    for key in before:
        assert before[key] == after[key], f"{estimator!r} changed the model's {key}"
    units = [info.name for info in discover(model)[0]]
    assert table.layers == units, f"{estimator!r} table layers {table.layers} != units {units}"
    assert len(table.frame) == len(units) * len(options)
    damage = table.frame["damage"].to_numpy(float)
    assert np.isfinite(damage).all(), f"{estimator!r} gave non-finite damage"
    wide = table.frame.pivot(index="layer", columns="option", values="damage")
    assert wide[options[0]].sum() >= wide[options[-1]].sum(), f"{estimator!r}: {options[0]} beats {options[-1]}"
    return table


def _token_batches(vocab: int, seed: int, n: int = 4, length: int = 12) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, length), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, length // 2 :] = 0  # one padded sequence: padding must never count
    return [{"input_ids": ids, "attention_mask": mask}]


def tiny_transformers(seed: int = 0) -> dict[str, Callable[[], tuple[nn.Module, list]]]:
    """name -> builder of (random-init transformers model in eval mode, padded token batches)."""

    def bert():
        from transformers import BertConfig, BertModel

        torch.manual_seed(seed)
        cfg = BertConfig(
            vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48
        )
        return BertModel(cfg, add_pooling_layer=False).eval(), _token_batches(96, seed)

    def llama(arch: str = "Llama", tied: bool = True):
        import transformers

        torch.manual_seed(seed)
        cfg = getattr(transformers, f"{arch}Config")(
            vocab_size=96,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=tied,
            attn_implementation="sdpa",
        )
        return getattr(transformers, f"{arch}ForCausalLM")(cfg).eval(), _token_batches(96, seed)

    def gpt2():
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(seed)
        cfg = GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=32, bos_token_id=0, eos_token_id=0)
        return GPT2LMHeadModel(cfg).eval(), _token_batches(96, seed)

    return {"bert": bert, "llama": llama, "gpt2": gpt2, "qwen2": lambda: llama("Qwen2", tied=False)}


# ------------------------------------------------------------------------------ runtimes, quantizers, layers
def runtime_instances() -> list:
    """Every registered runtime that owns options (the plan-JSON writer has none)."""
    from mpsearch.runtimes import RUNTIMES

    return [r for r in RUNTIMES.values() if not r.writer_only]


def runtime_weight(rows: int = 32, row: int = 512, seed: int = 0) -> torch.Tensor:
    """Gaussian rows plus the rows quantizers get wrong: all zero, constant, one-signed, one outlier."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, row, generator=g) * 0.02
    w[1] = 0.0
    w[2] = 0.01
    w[3] = w[3].abs()
    w[4, 7] = 0.5
    return w


def check_runtime(runtime) -> int:
    """A runtime's registration is consistent with itself and with the runtime: each of its default options
    parses back to it, resolves as its own and refuses other targets' options; quantizing keeps the shape and
    dtype and pads rows that are not whole units; and where the runtime's own package is here (``reference``),
    the bits mpsearch charges are the bytes the runtime stores and its decoded values are mpsearch's fake
    quantization, exactly. Returns how many options were compared with the runtime itself."""
    from mpsearch.core import MpsearchError, parse_option
    from mpsearch.quant.iquants_grid import NEEDS_IMATRIX
    from mpsearch.runtimes import runtime_of

    w = runtime_weight()
    compared = 0
    assert runtime.default_options, f"{runtime.name}: no default options for --target"
    for name in runtime.default_options:
        opt = parse_option(name)
        assert runtime_of(opt) is runtime and runtime.accepts(opt), name
        assert runtime.resolve([name]) == [name], name
        # llama.cpp's iq2_xs exists only with an importance matrix: given one of the weight's columns
        imatrix = {"imatrix": torch.linspace(0.5, 2.0, w.shape[1])} if name in NEEDS_IMATRIX else {}
        q = runtime.quantize(w, opt, **imatrix)
        assert q.shape == w.shape and q.dtype == w.dtype and torch.isfinite(q).all(), name
        odd = w[:, :-3]  # rows that are not whole blocks or groups: padded, still the input's shape
        odd_imatrix = {k: v[:-3] for k, v in imatrix.items()}
        assert runtime.quantize(odd, opt, **odd_imatrix).shape == odd.shape, name
        try:
            ref = runtime.reference(w, opt, **imatrix)
        except ImportError:
            ref = None
        if ref is None:
            continue
        stored, decoded = ref
        assert 8 * stored == opt.storage_bits(tuple(w.shape)), f"{name}: charged {opt.storage_bits(w.shape)} bits"
        if decoded is not None:
            mine = runtime.quantize(w.to(decoded.dtype), opt, **imatrix)
            assert torch.equal(decoded.float(), mine.float()), f"{name}: differs from the runtime's own decoding"
            compared += 1
    others = [o for r in runtime_instances() if r is not runtime for o in r.default_options]
    if others and runtime.prefix == "" and runtime.name != "mpsearch":
        try:
            runtime.resolve([others[0]])
        except MpsearchError:
            pass
        else:
            raise AssertionError(f"{runtime.name} accepted {others[0]!r}, another runtime's option")
    return compared


def check_quantizer(quantizer, model: nn.Module, data: list, plan) -> None:
    """What a quantizer applies is what was measured: ``apply_plan`` (a copy and in place), ``quantized`` and
    ``PlanFitness`` hold the very weights ``quantizer.quantize`` gives, the Measured estimator's loss of one
    layer equals ``evaluate`` of that layer's plan, and ``evaluate`` of the plan equals ``PlanFitness``."""
    import copy as _copy

    import mpsearch
    from mpsearch.core import BitPlan
    from mpsearch.fitness import PlanFitness
    from mpsearch.layers import unit_map
    from sensitivity import Measured

    units = unit_map(model)
    expected = {name: quantizer.quantize(units[name], option) for name, option in plan.items()}
    copied = mpsearch.apply_plan(model, plan, quantizer=quantizer)
    inplace = mpsearch.apply_plan(_copy.deepcopy(model), plan, inplace=True, quantizer=quantizer)
    fitness = PlanFitness(model, data, quantizer=quantizer)
    loss = fitness(BitPlan(dict(plan.assignments)))
    with mpsearch.quantized(model, plan, quantizer=quantizer):
        inside = {name: units[name].weight.detach().clone() for name in plan}
    for name, want in expected.items():
        for label, got in (
            ("apply_plan", unit_map(copied)[name].weight),
            ("apply_plan(inplace)", unit_map(inplace)[name].weight),
            ("quantized", inside[name]),
            ("PlanFitness", fitness._current[units[name]][1]),
        ):
            assert torch.equal(got.detach(), want), f"{quantizer.name}: {label} differs for {name}"
    measured = mpsearch.evaluate(
        model, BitPlan(dict(plan.assignments)), data, quantizer=quantizer, progress=False, uniform=False
    )
    assert abs(measured["loss"] - loss) <= 1e-9 * max(1.0, abs(loss)), (measured["loss"], loss)
    name, option = next(iter(plan.items()))
    table = Measured(progress=False).estimate(
        model, data, [option], include=[name], cache=False, quantizer=quantizer, loss_fn=fitness.objective.name
    )
    one = mpsearch.evaluate(
        model, BitPlan({name: option}), data, quantizer=quantizer, progress=False, uniform=False, runtime_inputs=True
    )  # Measured rounds the layer's inputs as its runtime does, as evaluate then does
    assert abs(float(table.frame["loss"].iloc[0]) - one["loss"]) <= 1e-9 * max(1.0, one["loss"])


# one small instance of each registered layer type, with an input it takes (a new registration needs one here)
def layer_examples() -> dict[type, Callable[[], tuple[nn.Module, torch.Tensor]]]:
    examples: dict[type, Callable[[], tuple[nn.Module, torch.Tensor]]] = {
        nn.Linear: lambda: (nn.Linear(12, 8), torch.randn(4, 5, 12)),
        nn.Conv1d: lambda: (nn.Conv1d(4, 6, 3, padding=1), torch.randn(3, 4, 10)),
        nn.Conv2d: lambda: (nn.Conv2d(3, 6, 3, padding=1), torch.randn(2, 3, 6, 6)),
        nn.Embedding: lambda: (nn.Embedding(20, 8), torch.randint(0, 20, (3, 7))),
    }
    try:
        from transformers.pytorch_utils import Conv1D

        examples[Conv1D] = lambda: (Conv1D(8, 12), torch.randn(4, 5, 12))
    except ImportError:  # transformers is a dependency; its absence is not this check's business
        pass
    return examples


def check_layer_type(entry, example: Callable[[], tuple[nn.Module, torch.Tensor]]) -> None:
    """A registered layer type's behaviour holds for an instance: discovered as one unit of its kind with its
    weight output-channels-first, MACs per sample equal to outputs x in_per_output counted from a real call,
    SQNR's "matmul"/"lookup" statistics equal to calling the layer with dW ("call"), and GPTQ covering it
    exactly when its inputs enter a matmul."""
    import mpsearch
    from mpsearch.layers import find_units, layer_type
    from mpsearch.quant.gptq import GPTQ, covers
    from mpsearch.quant.quantizer import RTN
    from sensitivity.sqnr import noise_ratios

    torch.manual_seed(0)
    module, x = example()
    model = nn.Sequential(module).eval()
    assert layer_type(module) is entry, f"{entry.module_type.__name__}: another registration wins"
    (unit,) = find_units(model)
    weight = module.weight.t() if entry.transposed else module.weight
    assert unit.weight.shape == weight.shape and torch.equal(unit.weight, weight)
    infos, _ = mpsearch.discover(model, example=x, include_embeddings=True)
    out = module(x)
    assert infos[0].macs == out.numel() // out.shape[0] * entry.in_per_output(module)
    assert infos[0].kind == entry.kind_of(module)
    opt = mpsearch.parse_option("int3")
    ratios = noise_ratios(model, [x], [unit], [opt], RTN())
    delta = RTN().error(unit, opt)
    delta = delta.t() if entry.transposed else delta
    with torch.no_grad():
        if entry.inputs == "lookup":
            noise = nn.functional.embedding(x, delta)
        else:
            zero = {"bias": torch.zeros_like(module.bias)} if module.bias is not None else {}
            noise = torch.func.functional_call(module, {"weight": delta, **zero}, (x,))
    direct = float(noise.double().pow(2).sum() / out.double().pow(2).sum())
    assert abs(float(ratios["output_nsr"].iloc[0]) - direct) <= 1e-4 * direct
    assert covers(unit) == (entry.inputs == "matmul")
    if covers(unit):
        assert unit.name in GPTQ(model, [x], progress=False).factors


def hold(seconds: float = 60.0) -> None:
    """Test hook (``MPSEARCH_TEST_HOLD=<file>``): say that quantized weights are swapped in by creating the file,
    then wait there, so that a test's signal arrives in the middle of the work and never after its end."""
    import os
    import time
    from pathlib import Path

    Path(os.environ["MPSEARCH_TEST_HOLD"]).touch()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(0.05)
