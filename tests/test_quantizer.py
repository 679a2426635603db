"""The quantizer travels with the plan: a GPTQ plan is applied, swapped in and evaluated with exactly the GPTQ
it was searched with (rebuilt from its spec and the search's calibration data, or loaded from the cache), or
refused in one line; never round to nearest in its place."""

import copy

import pytest
import torch

import mpsearch
from mpsearch.core import Budget, MpsearchError
from mpsearch.data import data_fingerprint
from mpsearch.fitness import PlanFitness
from mpsearch.layers import unit_map
from mpsearch.quant import quantize_weight
from mpsearch.quant.gptq import GPTQ
from mpsearch.quant.gptq_cache import cached_gptq
from mpsearch.quant.quantizer import RTN, for_plan
from mpsearch.safety import holdout

OPTIONS = ["int3_g32", "int4_g32", "int8"]
DOWN = "model.layers.0.mlp.down_proj"


@pytest.fixture(scope="module")
def llama():
    """The issue's case: a random-init transformers Llama (hidden 64, two blocks) and token batches."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(1)
    data = [{"input_ids": torch.randint(0, 128, (4, 24), generator=g)} for _ in range(8)]
    result = mpsearch.search(model, data, Budget(avg_bits=4.5), "sqnr", options=OPTIONS, quantizer="gptq", refine=2)
    return model, data, result


def test_the_plan_records_the_quantizers_spec_and_its_calibration_split(llama):
    model, data, result = llama
    spec = result.plan.provenance["quantizer"]
    fit, _ = holdout(data)
    assert spec["name"] == "gptq" and spec["params"]["damp"] == 0.01 and spec["params"]["act_order"] is True
    assert spec["calibration"] == data_fingerprint(fit) != data_fingerprint(data)  # built on the fit split only
    assert result.plan.provenance["calibration"] == {"data": data_fingerprint(data), "holdout": 0.25}
    restored = mpsearch.BitPlan.from_json(result.plan.to_json())
    assert restored.provenance["quantizer"] == spec  # survives the JSON round trip


def test_apply_plan_and_quantized_use_gptq_not_round_to_nearest(llama):
    model, data, result = llama
    plan = result.plan
    gptq = GPTQ(model, holdout(data)[0])  # the searched quantizer, built by hand
    unit = unit_map(model)[DOWN]
    expected = gptq.quantize(unit, plan[DOWN])
    rtn = quantize_weight(unit.weight, plan[DOWN])
    assert not torch.equal(expected, rtn)
    copied = mpsearch.apply_plan(model, plan, calibration=data)  # a deep copy: GPTQ keyed by name serves it
    assert torch.equal(copied.get_submodule(DOWN).weight, expected)
    before = model.get_submodule(DOWN).weight.clone()
    with mpsearch.quantized(model, plan, quantizer=gptq):
        assert torch.equal(model.get_submodule(DOWN).weight, expected)
    assert torch.equal(model.get_submodule(DOWN).weight, before)
    other = copy.deepcopy(model)
    mpsearch.apply_plan(other, plan, inplace=True)  # no data given: the GPTQ search cached under its spec
    assert torch.equal(other.get_submodule(DOWN).weight, expected)


def test_evaluate_of_the_plan_equals_the_loss_the_measured_check_saw(llama):
    model, data, result = llama
    safety = result.extra["safety"]
    chosen = safety["chosen"]
    if chosen.startswith("uniform-"):
        seen = safety["uniform_losses"][chosen.removeprefix("uniform-")]
    else:
        seen = safety["refined_loss"] if chosen == "refined" else safety["searched_loss"]
    _, check = holdout(data)
    got = mpsearch.evaluate(model, result.plan, check, calibration=data, progress=False)
    assert got["loss"] == pytest.approx(seen, rel=1e-6)
    rtn = mpsearch.evaluate(model, mpsearch.BitPlan(dict(result.plan.assignments)), check, progress=False)
    assert rtn["loss"] != pytest.approx(seen, rel=1e-3)  # round to nearest measures another model
    gptq = GPTQ(model, holdout(data)[0])
    assert PlanFitness(model, check, quantizer=gptq)(result.plan) == pytest.approx(got["loss"], rel=1e-6)


def test_a_gptq_plan_without_its_quantizer_is_refused_in_one_line(llama, tmp_path, monkeypatch):
    model, data, result = llama
    plan = result.plan
    monkeypatch.setenv("MPSEARCH_CACHE", str(tmp_path))  # nothing cached
    cases = {
        "neither given nor cached": lambda: mpsearch.apply_plan(model, plan),
        "searched with gptq": lambda: mpsearch.evaluate(model, plan, data, quantizer="rtn"),
        "damp=0.05 instead of 0.01": lambda: mpsearch.apply_plan(model, plan, quantizer=GPTQ(model, data, damp=0.05)),
        "calibration data": lambda: mpsearch.apply_plan(model, plan, quantizer=GPTQ(model, data)),
        "not the data this plan": lambda: mpsearch.apply_plan(model, plan, calibration=data[:3]),
    }
    for match, call in cases.items():
        with pytest.raises(MpsearchError, match=match) as err:
            call()
        assert "\n" not in str(err.value), match
    with pytest.raises(MpsearchError, match="searched with gptq"):
        with mpsearch.quantized(model, plan, quantizer=RTN()):
            pass


def test_gptq_keyed_by_unit_name_refuses_a_linear_unit_it_does_not_know():
    from torch import nn

    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    data = [torch.randn(32, 16) for _ in range(2)]
    gptq = GPTQ(model, data, progress=False)
    renamed = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Identity(), nn.Linear(8, 4))
    with pytest.raises(MpsearchError, match="no Hessian for layer '3'"):
        gptq.quantize(unit_map(renamed)["3"], "int4")
    wider = nn.Sequential(nn.Linear(32, 8))
    with pytest.raises(MpsearchError, match="16-input Hessian for layer '0'.* 32 inputs"):
        gptq.quantize(unit_map(wider)["0"], "int4")


def test_a_saved_gptq_state_quantizes_exactly_as_the_built_one(tmp_path, monkeypatch):
    from torch import nn

    monkeypatch.setenv("MPSEARCH_CACHE", str(tmp_path))
    model = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 4))
    data = [torch.randn(32, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    built = cached_gptq(model, data, {"damp": 0.02})
    assert built.passes == 1 and list((tmp_path / "quantizers").glob("gptq-*.pt"))
    loaded = cached_gptq(model, data, {"damp": 0.02})
    assert loaded is not built and loaded.passes == built.passes and loaded.spec() == built.spec()
    other = cached_gptq(model, data, {"damp": 0.03})  # other math: not the cached one
    for name, unit in unit_map(model).items():
        assert torch.equal(loaded.quantize(unit, "int3_g8"), built.quantize(unit, "int3_g8")), name
    assert not torch.equal(other.factors["2"].hinv, built.factors["2"].hinv)
    plan = mpsearch.BitPlan({"0": "int3", "2": "int4"}, {"quantizer": built.spec()})
    assert for_plan(model, plan).spec() == built.spec()  # found in the cache by its spec


def test_every_tensor_of_every_batch_form_enters_the_data_fingerprint():
    a, b = torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.long)
    forms = [
        lambda t: t,
        lambda t: (t,),
        lambda t: {"input_ids": t},
        lambda t: ({"input_ids": t},),  # tuples of dicts (a sentence-transformers batch)
        lambda t: [{"input_ids": t, "attention_mask": torch.ones_like(a)}],
        lambda t: {"features": {"input_ids": t}},
    ]
    for form in forms:
        assert data_fingerprint([form(a)]) != data_fingerprint([form(b)]), form([0])
    assert data_fingerprint([{"x": a, "y": b}]) != data_fingerprint([{"x": b, "y": a}])  # keys count
