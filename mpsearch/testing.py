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
