import math

import numpy as np
import pytest
import torch
from torch import nn

from mpsearch.core import MpsearchError
from mpsearch.outputs import kl_div
from mpsearch.quant import quantize_weight
from sensitivity import SQNR, Entropy, Fisher, HessianTrace, Measured, Relevance, get_estimator


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 5)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.fixture
def small():
    torch.manual_seed(0)
    data = [torch.randn(64, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    return Small(), data


def _snapshot(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        {n: m.training for n, m in model.named_modules()},
        {n: p.requires_grad for n, p in model.named_parameters()},
        {
            n: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for n, m in model.named_modules()
        },
    )


ALL = [
    SQNR(progress=False),
    Measured(progress=False),
    HessianTrace(min_probes=2, max_probes=4, progress=False),
    HessianTrace(method="hutchpp", sketch=2, max_probes=2, progress=False),
    Fisher(max_samples=16, progress=False),
    Entropy(progress=False),
    Relevance(progress=False),
]


@pytest.mark.parametrize("estimator", ALL, ids=lambda e: repr(e))
def test_estimators_do_not_mutate_the_model(small, estimator):
    model, data = small
    model.train()
    model.fc1.weight.requires_grad_(False)
    model.fc2.register_forward_hook(lambda *a: None)
    before = _snapshot(model)
    table = estimator.estimate(model, data, ["int2", "int4", "int8"], cache=False)
    after = _snapshot(model)
    for k in before[0]:
        assert torch.equal(before[0][k], after[0][k])
    assert before[1:] == after[1:]
    assert table.meta["estimator"] == estimator.name
    assert table.meta["params"] == {k: v for k, v in estimator.get_params().items() if k != "progress"}
    wide = table.frame.pivot(index="layer", columns="option", values="damage")
    assert (wide["int2"] > wide["int8"]).all()  # every estimator ranks 2 bits as worse than 8


def test_sqnr_matches_direct_computation(small):
    model, data = small
    table = SQNR(progress=False).estimate(model, data, ["int3", "int8"])
    x = torch.cat(data)
    w = model.fc1.weight
    dw = quantize_weight(w, "int3") - w
    with torch.no_grad():
        signal = model.fc1(x).double().pow(2).sum()
        noise = (x @ dw.T).double().pow(2).sum()
    row = table.frame.query("layer == 'fc1' and option == 'int3'").iloc[0]
    assert row.sqnr_db == pytest.approx(10 * math.log10(signal / noise), rel=1e-6)
    assert row.damage == pytest.approx(float(noise / signal), rel=1e-6)
    for layer in ("fc1", "fc2"):
        rows = table.frame[table.frame.layer == layer].set_index("option")
        assert rows.loc["int8", "sqnr_db"] > rows.loc["int3", "sqnr_db"] + 25  # ~6 dB per bit
        assert rows.loc["int8", "sqnr_weight_db"] > rows.loc["int3", "sqnr_weight_db"] + 25


def test_sqnr_handles_convs_with_their_own_padding(effnet):
    table = SQNR(progress=False).estimate(effnet.model, [effnet.calibration[0][:2]], ["int4", "int8"])
    stem = table.frame.query("layer == '_conv_stem'").set_index("option")
    assert 10 < stem.loc["int4", "sqnr_db"] < stem.loc["int8", "sqnr_db"]
    assert len(table.layers) == 50


def test_measured_equals_loss_of_single_layer_quantized_model(small):
    model, data = small
    table = Measured(progress=False).estimate(model, data, ["int2", "int4"], loss_fn="kl")
    q = Small()
    q.load_state_dict(model.state_dict())
    with torch.no_grad():
        q.fc2.weight.copy_(quantize_weight(model.fc2.weight, "int2"))
        expected = np.mean([float(kl_div(q(x), model(x))) for x in data])
    got = table.frame.query("layer == 'fc2' and option == 'int2'").damage.item()
    assert got == pytest.approx(expected, rel=1e-6)
    assert (table.frame.set_index(["layer", "option"]).damage.unstack()["int2"] > 0).all()


def test_measured_damage_falls_with_bits_on_digits(digits):
    table = Measured(progress=False).estimate(digits.model, digits.calibration, ["int2", "int4", "int8"])
    wide = table.frame.pivot(index="layer", columns="option", values="damage")
    assert (wide["int2"] > wide["int4"]).all() and (wide["int4"] > wide["int8"]).all()


def test_bad_inputs(small):
    model, data = small
    with pytest.raises(MpsearchError, match="calibration data is empty"):
        SQNR().estimate(model, [])
    with pytest.raises(MpsearchError, match="not a torch.nn.Module"):
        SQNR().estimate("model", data)
    with pytest.raises(MpsearchError, match="unknown loss"):
        Measured().estimate(model, data, loss_fn="mse2")
    with pytest.raises(MpsearchError, match="unknown estimator 'hessian2'"):
        get_estimator("hessian2")
    with pytest.raises(MpsearchError, match="no quantizable layers"):
        SQNR().estimate(nn.ReLU(), data)


def test_sqnr_gram_statistics_match_direct_noise_on_a_llama_with_shared_inputs_and_tied_embeddings():
    # q/k/v (and gate/up) read one tensor and share one X^T X; the tied lm_head also counts the embedding's
    # lookup noise: check every unit against ||X dW^T||^2 / ||Y||^2 computed directly
    from mpsearch.testing import tiny_transformers

    model, data = tiny_transformers()["llama"]()
    table = SQNR(progress=False).estimate(model, data, ["int3"], cache=False)
    inputs, outs = {}, {}

    def record(name):
        def hook(mod, args, output):
            inputs[name], outs[name] = args[0], output

        return hook

    hooks = [
        m.register_forward_hook(record(n)) for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Embedding)
    ]
    with torch.no_grad():
        model(**data[0])
    for h in hooks:
        h.remove()
    got = table.frame.set_index("layer")["output_nsr"]
    w = model.lm_head.weight.detach()
    dw = quantize_weight(w, "int3") - w
    with torch.no_grad():
        for name in [n for n in got.index if n != "lm_head"]:
            weight = model.get_submodule(name).weight
            delta = quantize_weight(weight, "int3") - weight
            expected = (inputs[name] @ delta.T).double().pow(2).sum() / outs[name].double().pow(2).sum()
            assert got[name] == pytest.approx(float(expected), rel=1e-4), name
        head = (inputs["lm_head"] @ dw.T).double().pow(2).sum() / outs["lm_head"].double().pow(2).sum()
        emb = dw[data[0]["input_ids"]].double().pow(2).sum() / outs["model.embed_tokens"].double().pow(2).sum()
    assert got["lm_head"] == pytest.approx(float(head + emb), rel=1e-4)
    assert float(emb) > 0.01 * float(head)  # the embedding's share is not negligible here
