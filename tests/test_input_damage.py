"""The runtime's input rounding in the cost table (``sensitivity.inputs``): Fisher's input term against the closed
form of a linear softmax model, on both of its tap paths; Measured's rounding against ``evaluate``'s; the
tables of both with it off; and the f16 type whose inputs llama.cpp keeps in fp16."""

import numpy as np
import pytest
import torch
from torch import nn

import mpsearch
from mpsearch.core import parse_option
from mpsearch.runtimes.llama_cpp_inputs import round_input
from sensitivity import Fisher, Measured

OPTIONS = ["f16", "q8_0", "q4_1"]


def _model_and_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32, bias=False), nn.Linear(32, 3, bias=False))
    x = torch.randn(24, 64) * torch.linspace(0.2, 3.0, 64)
    x[:, 5] *= 20  # an outlier column: 8-bit blocks round its neighbours coarsely
    return model, x


def _closed_form(model, x, layer: int, rounding: str) -> float:
    """1/2 mean_x e^T J^T (diag p - p p^T) J e, e = R(h) - h the rounding error of layer ``layer``'s input h
    and J the (linear) map from it to the logits."""
    w1, w2 = (m.weight.detach().double() for m in model)
    # the very values the layer gets, one sample at a time as Fisher runs them: fp16 rounding is that sensitive
    h = x if layer == 0 else torch.stack([model[0](row).detach() for row in x])
    e = (round_input(h, rounding) - h).double()
    j = w2 @ w1 if layer == 0 else w2
    p = torch.softmax(model(x).detach().double(), -1)
    v = e @ j.t()  # the logits' change
    quad = (p * v * v).sum(-1) - (p * v).sum(-1) ** 2
    return 0.5 * float(quad.mean())


def test_fishers_input_damage_is_the_closed_form_on_both_tap_paths():
    # one row of 3 classes per sample: Fisher takes the exact expectation, so the term is exact; layer 0's
    # input needs no gradient (a leaf tapped), layer 1's does (a view tapped)
    model, x = _model_and_data()
    table = Fisher(max_samples=24, progress=False).estimate(model, [x[:12], x[12:]], OPTIONS, "kl", cache=False)
    plain = Fisher(max_samples=24, runtime_inputs=False, progress=False).estimate(
        model, [x[:12], x[12:]], OPTIONS, "kl", cache=False
    )
    frame = table.frame.set_index(["layer", "option"])
    for layer, name in enumerate(("0", "1")):
        for option, rounding in (("q8_0", "q8_0"), ("q4_1", "q8_1"), ("f16", "f16")):
            want = _closed_form(model, x, layer, rounding)
            assert frame.loc[(name, option), "input_damage"] == pytest.approx(want, rel=1e-4)
        # q4_1's inputs are Q8_1 (the Q8_0 levels): the same term; fp16 inputs cost far less
        assert frame.loc[(name, "q8_0"), "input_damage"] == frame.loc[(name, "q4_1"), "input_damage"]
        assert frame.loc[(name, "f16"), "input_damage"] < 0.01 * frame.loc[(name, "q8_0"), "input_damage"]
    assert np.allclose(table.frame.damage - table.frame.input_damage, plain.frame.damage, rtol=1e-6, atol=0)
    assert "input_damage" not in plain.frame and table.meta["runtime_inputs"] and not plain.meta["runtime_inputs"]
    assert not any(m._forward_pre_hooks for m in model.modules())
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


def test_fisher_adds_no_input_term_for_runtimes_that_round_none():
    model, x = _model_and_data()
    table = Fisher(max_samples=8, progress=False).estimate(model, [x[:8]], ["int4_g32"], "kl", cache=False)
    assert "input_damage" not in table.frame and not table.meta["runtime_inputs"]


def test_measured_rounds_the_measured_layers_inputs_as_evaluate_does():
    model, x = _model_and_data()
    data = [x[:12], x[12:]]
    table = Measured(progress=False).estimate(model, data, OPTIONS, "kl", cache=False).frame
    plain = Measured(runtime_inputs=False, progress=False).estimate(model, data, OPTIONS, "kl", cache=False).frame
    for layer in ("0", "1"):
        for option in OPTIONS:
            row = (table.layer == layer) & (table.option == option)
            measured = mpsearch.evaluate(
                model, {layer: option}, data, "kl", progress=False, uniform=False, runtime_inputs=True
            )
            assert table[row].damage.item() == pytest.approx(measured["loss"], rel=1e-5, abs=1e-12)
    q8 = (table.option == "q8_0") & (table.layer == "0")
    assert table[q8].damage.item() > 2 * plain[q8].damage.item()  # the outlier's block: rounding dominates


def test_f16_is_a_gguf_type_of_fp16_weights_and_inputs():
    import gguf

    from mpsearch.quant.llama_cpp import quantize_rows

    option = parse_option("f16")
    assert (option.runtime, option.block_size, option.block_bytes) == ("llama.cpp", 1, 2)
    assert option.storage_bits((4, 96)) == 4 * 96 * 16
    w = torch.randn(4, 96) * 100
    w[0, 0] = 70000.0  # beyond fp16: inf, as ggml's conversion makes it
    packed, values = quantize_rows(w, option)
    assert packed.dtype == torch.uint8 and packed.shape == (4, 192)
    with np.errstate(over="ignore"):
        assert np.array_equal(packed.numpy().view(np.float16), w.numpy().astype(np.float16))
    decoded = gguf.quants.dequantize(packed.numpy(), gguf.GGMLQuantizationType.F16)
    assert np.array_equal(decoded, values.numpy()) and values[0, 0] == float("inf")


def test_a_plan_searched_with_the_rounding_is_measured_with_it_by_default():
    from mpsearch.fitness import PlanFitness

    model, x = _model_and_data()
    data = [x[:12], x[12:]]
    table = Fisher(max_samples=24, progress=False).estimate(model, data, ["q8_0", "q4_1"], "kl", cache=False)
    plan = mpsearch.solve(table, mpsearch.Budget(avg_bits=6.0)).plan
    assert plan.provenance["runtime_inputs"] is True
    default, rounded, plain = (
        mpsearch.evaluate(model, plan, data, "kl", progress=False, uniform=False, runtime_inputs=r)
        for r in (None, True, False)
    )
    assert default["loss"] == rounded["loss"] != plain["loss"]
    for flag, want in ((True, rounded), (False, plain)):
        fitness = PlanFitness(model, data, "kl", runtime_inputs=flag)
        assert fitness(plan) == pytest.approx(want["loss"], rel=1e-9)
    assert not any(m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("runtime_inputs", [True, False])
def test_the_measured_check_measures_as_the_table_was_estimated(runtime_inputs):
    # search(safe=True): the held-out check (SearchContext.fitness) rounds the inputs when the table counted
    # the rounding, and not otherwise; its loss of the searched plan is evaluate's on the held-out batches
    from mpsearch.context import SearchContext

    model, x = _model_and_data()
    data = [x[:6], x[6:12], x[12:18], x[18:]]
    ctx = SearchContext.resolve(
        model, data, mpsearch.Budget(avg_bits=6.0), "fisher", "core", ["q8_0", "q4_1"], "kl",
        estimator_params={"max_samples": 18, "runtime_inputs": runtime_inputs, "progress": False}, refine=0,
        cache=False,
    )  # fmt: skip
    result = ctx.run()
    assert result.extra["table"].meta["runtime_inputs"] is runtime_inputs
    searched = result.extra["searched_plan"]
    assert searched.provenance["runtime_inputs"] is runtime_inputs
    rounded, plain = (
        mpsearch.evaluate(model, searched, ctx.check, "kl", progress=False, uniform=False, runtime_inputs=r)["loss"]
        for r in (True, False)
    )
    assert rounded != plain
    want = rounded if runtime_inputs else plain
    assert result.extra["safety"]["searched_loss"] == pytest.approx(want, rel=1e-9)
