import numpy as np
import pytest
import torch
from torch import nn

import mpsearch
from mpsearch.layers import discover, model_fingerprint


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 8)
        self.conv1d = nn.Conv1d(8, 8, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1, groups=6))
        self.attn = nn.Module()
        self.attn.q_proj, self.attn.k_proj, self.attn.v_proj = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 6)
        self.head = nn.Linear(6, 4)
        self.tied_head = nn.Linear(6, 4)
        self.tied_head.weight = self.head.weight

    def forward(self, x, tokens):
        e = self.conv1d(self.emb(tokens).transpose(1, 2)).mean()
        h = self.body(x).mean((2, 3))
        h = self.attn.q_proj(h) + self.attn.k_proj(h) + self.attn.v_proj(h)
        return self.head(h) + self.tied_head(h) + e


def test_discover_names_kinds_macs_and_ties():
    model = Mixed()
    example = (torch.randn(2, 3, 5, 5), torch.randint(0, 50, (2, 7)))
    layers, ties = discover(model, example=example)
    by_name = {info.name: info for info in layers}
    assert list(by_name) == [
        "conv1d",
        "body.0",
        "body.1",
        "attn.q_proj",
        "attn.k_proj",
        "attn.v_proj",
        "head",
    ]
    assert by_name["body.1"].kind == "depthwise_conv"
    assert by_name["body.0"].kind == "conv2d"
    assert by_name["body.0"].macs == 6 * 5 * 5 * 3 * 9  # outputs per sample x (in/groups * kernel)
    assert by_name["body.1"].macs == 6 * 5 * 5 * 9
    assert by_name["conv1d"].macs == 8 * 7 * 8 * 3
    # one shared tensor = one unit: named after its first module, the other listed as an alias, MACs of both
    assert by_name["head"].aliases == ("tied_head",)
    assert by_name["head"].macs == 2 * 4 * 6
    assert ties == []
    _, fused = discover(model, tie_fused=True)
    assert fused == [["attn.q_proj", "attn.k_proj", "attn.v_proj"]]
    with_emb, _ = discover(model, include_embeddings=True)
    assert "emb" in [i.name for i in with_emb]
    assert all(i.macs is None for i in discover(model)[0])


def test_discover_leaves_no_hooks_and_fingerprint_tracks_weights():
    model = Mixed()
    fp = model_fingerprint(model)
    discover(model, example=(torch.randn(1, 3, 4, 4), torch.randint(0, 50, (1, 3))))
    assert all(not m._forward_hooks for m in model.modules())
    assert model_fingerprint(model) == fp
    with torch.no_grad():
        model.head.weight[0, 0] += 1e-6
    assert model_fingerprint(model) != fp


def test_include_and_exclude_patterns_select_units_and_unknown_patterns_fail():
    import pytest

    from mpsearch.core import MpsearchError

    model = Mixed()
    names = lambda **kw: [i.name for i in discover(model, **kw)[0]]  # noqa: E731
    assert names(include="attn.*") == ["attn.q_proj", "attn.k_proj", "attn.v_proj"]
    assert names(include=["re:body\\.[01]"], exclude="body.1") == ["body.0"]
    assert names(exclude="tied_head") == ["conv1d", "body.0", "body.1", "attn.q_proj", "attn.k_proj", "attn.v_proj"]
    with pytest.raises(MpsearchError, match="exclude pattern 'lm_head' matches no quantizable layer"):
        discover(model, exclude="lm_head")


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=32)).eval()


def test_gpt2_conv1d_layers_are_found_with_out_first_shapes_and_quantized_on_their_output_axis():
    from transformers.pytorch_utils import Conv1D

    import mpsearch
    from mpsearch.quant import quantize_weight

    model = _tiny_gpt2()
    ids = torch.randint(0, 64, (2, 8))
    layers, _ = discover(model, example=ids)
    conv1d = {n for n, m in model.named_modules() if isinstance(m, Conv1D)}
    assert len(conv1d) == 8 and conv1d <= {i.name for i in layers}
    head = next(i for i in layers if i.name == "lm_head")
    assert head.aliases == ("transformer.wte",) and len(layers) == 9  # 4 per block + the tied head
    c_fc = next(i for i in layers if i.name == "transformer.h.0.mlp.c_fc")
    assert c_fc.shape == (64, 16) and c_fc.transposed  # stored [in=16, out=64]
    assert c_fc.macs == 8 * 64 * 16  # tokens x outputs x inputs per sequence
    quantized = mpsearch.apply_plan(model, {"transformer.h.0.mlp.c_fc": "int2"})
    stored = model.get_submodule("transformer.h.0.mlp.c_fc").weight
    expected = quantize_weight(stored.detach().t(), "int2").t()  # one scale per OUTPUT channel (column)
    assert torch.equal(quantized.get_submodule("transformer.h.0.mlp.c_fc").weight, expected)
    assert not torch.equal(expected, quantize_weight(stored.detach(), "int2"))  # the other axis differs


def test_tied_embedding_is_one_unit_quantized_once_and_counted_once():
    import mpsearch

    model = _tiny_gpt2()
    plan = mpsearch.uniform_plan(model, "int4")
    assert "lm_head" in plan.assignments and "transformer.wte" not in plan.assignments
    quantized = mpsearch.apply_plan(model, plan)
    assert quantized.lm_head.weight is quantized.transformer.wte.weight  # still tied, quantized once
    assert not torch.equal(quantized.transformer.wte.weight, model.transformer.wte.weight)
    n_params = sum(i.n_params for i in discover(model)[0])
    # named_parameters lists a shared tensor once: every 2-D weight but the position table
    assert n_params == sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "wpe" not in n)
    size = mpsearch.plan_size(model, plan)
    assert size["avg_bits"] == mpsearch.plan_size(model, {"transformer.wte": "int4", **plan.assignments})["avg_bits"]
    with __import__("pytest").raises(mpsearch.InvalidPlanError, match="shares its weight"):
        mpsearch.apply_plan(model, {"lm_head": "int4", "transformer.wte": "int8"})


def test_an_untied_embedding_joins_only_when_an_include_pattern_names_it():
    model = Mixed()
    assert "emb" not in [i.name for i in discover(model)[0]]
    assert [i.name for i in discover(model, include=["emb", "head"])[0]] == ["emb", "head"]
    assert "emb" in [i.name for i in discover(model, include="*")[0]]
    assert "emb" not in [i.name for i in discover(model, include_embeddings=True, exclude="emb")[0]]


def test_a_registered_layer_type_owns_its_behaviour_in_sqnr_gptq_and_discovery(monkeypatch):
    # a module type mpsearch has never seen: once registered, discovery, MACs, SQNR's input statistics and
    # GPTQ's Hessian all follow its registration ("matmul"), and "call" gives SQNR the same noise another way
    import mpsearch.layers as layers
    from mpsearch.quant.gptq import GPTQ
    from mpsearch.quant.quantizer import RTN
    from sensitivity.sqnr import noise_ratios

    class Projection(torch.nn.Module):  # not an nn.Linear: y = x W^T
        def __init__(self, n_in, n_out):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(n_out, n_in) * 0.1)

        def forward(self, x):
            return x @ self.weight.T

    torch.manual_seed(0)
    model = torch.nn.Sequential(Projection(16, 12), torch.nn.ReLU(), Projection(12, 4))
    data = [torch.randn(8, 16) for _ in range(2)]
    assert mpsearch.discover(model)[0] == []  # unknown type: nothing to plan
    frames = {}
    for inputs in ("matmul", "call"):
        monkeypatch.setattr(layers, "_REGISTRY", list(layers._REGISTRY))
        layers.register_layer(Projection, "linear", inputs=inputs)
        found, _ = mpsearch.discover(model, example=data[0])
        assert [i.name for i in found] == ["0", "2"] and found[0].macs == 16 * 12
        units = layers.find_units(model)
        frames[inputs] = noise_ratios(model, data, units, [mpsearch.parse_option("int3")], RTN())
        assert (GPTQ(model, data, progress=False).factors.keys() == {"0", "2"}) == (inputs == "matmul")
    np.testing.assert_allclose(frames["matmul"]["output_nsr"], frames["call"]["output_nsr"], rtol=1e-4)
    with pytest.raises(mpsearch.MpsearchError, match="inputs='conv'"):
        layers.register_layer(Projection, "linear", inputs="conv")
