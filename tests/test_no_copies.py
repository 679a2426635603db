"""Estimators, evaluate and PlanFitness work on the caller's model itself, where it lives: never a copy of
it, the model byte-identical afterwards even when a run is interrupted, and an out-of-memory reported with
what to lower. fp16/bf16 models work."""

import copy

import pytest
import torch
from torch import nn

import mpsearch
from mpsearch.core import MpsearchError
from mpsearch.fitness import PlanFitness
from mpsearch.quant.quantizer import RTN
from mpsearch.testing import check_estimator, estimator_instances, snapshot, tiny_transformers
from sensitivity.sqnr import noise_ratios, use_gram

ESTIMATORS = estimator_instances()
MODELS = tiny_transformers()
OPTIONS = ["int4", "int8"]


@pytest.fixture
def no_model_copies(monkeypatch):
    """copy.deepcopy of any nn.Module fails the test."""
    deepcopy = copy.deepcopy

    def guarded(obj, *args, **kwargs):
        if isinstance(obj, nn.Module):
            raise AssertionError(f"a deep copy of a {type(obj).__name__} was made")
        return deepcopy(obj, *args, **kwargs)

    monkeypatch.setattr(copy, "deepcopy", guarded)


@pytest.mark.parametrize("estimator", ESTIMATORS, ids=lambda e: e.name)
def test_estimators_never_copy_the_model(estimator, no_model_copies):
    model, data = MODELS["llama"]()
    check_estimator(estimator, model, data, OPTIONS)


def test_evaluate_and_fitness_never_copy_the_model(no_model_copies):
    model, data = MODELS["gpt2"]()
    before = snapshot(model)
    plan = mpsearch.uniform_plan(model, "int4")
    fitness = PlanFitness(model, data)
    first = fitness(plan)
    assert snapshot(model) == before  # the model is its own between trials
    assert fitness(mpsearch.uniform_plan(model, "int8")) < first
    assert fitness(plan) == pytest.approx(first, rel=1e-6)  # int4 weights requantized from the originals
    assert mpsearch.evaluate(model, plan, data)["loss"] == pytest.approx(first, rel=1e-5)
    assert snapshot(model) == before


def _stop_midway(model: nn.Module, estimator, data, error: BaseException):
    """Raise ``error`` half way through ``estimator``'s forward calls of one layer; return the snapshot
    taken just before the run."""
    layer = model.get_submodule("model.layers.1.mlp.down_proj")
    calls = [0]
    counter = layer.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    estimator.estimate(model, data, OPTIONS, cache=False)
    counter.remove()
    stop_at, seen = calls[0] // 2 + 1, [0]

    def interrupt(*_):
        seen[0] += 1
        if seen[0] == stop_at:
            raise error

    handle = layer.register_forward_hook(interrupt)
    return handle, snapshot(model)


@pytest.mark.parametrize("estimator", ESTIMATORS, ids=lambda e: e.name)
def test_an_interrupted_estimator_leaves_the_model_byte_identical(estimator):
    model, data = MODELS["llama"]()
    model.train()  # whatever mode the caller left it in survives
    handle, before = _stop_midway(model, estimator, data, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        estimator.estimate(model, data, OPTIONS, cache=False)
    assert snapshot(model) == before
    handle.remove()


@pytest.mark.parametrize("estimator", ESTIMATORS, ids=lambda e: e.name)
@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8589934592 bytes"),
    ],
    ids=["cuda", "cpu"],
)
def test_out_of_memory_names_the_estimator_and_what_to_lower(estimator, error):
    model, data = MODELS["llama"]()
    handle, before = _stop_midway(model, estimator, data, error)
    with pytest.raises(MpsearchError, match=f"estimator '{estimator.name}' ran out of memory") as info:
        estimator.estimate(model, data, OPTIONS, cache=False)
    assert estimator.memory_hint in str(info.value) and "the model is unchanged" in str(info.value)
    assert snapshot(model) == before
    handle.remove()


def test_other_errors_are_not_reported_as_out_of_memory():
    model, data = MODELS["llama"]()
    estimator = ESTIMATORS[0]
    handle, before = _stop_midway(model, estimator, data, RuntimeError("shape mismatch"))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        estimator.estimate(model, data, OPTIONS, cache=False)
    assert snapshot(model) == before
    handle.remove()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("estimator", ESTIMATORS, ids=lambda e: e.name)
def test_every_estimator_on_half_precision_models(estimator, dtype):
    model, data = MODELS["llama"]()
    model.to(dtype)
    check_estimator(estimator, model, data, OPTIONS)  # complete, finite, int4 >= int8, model untouched


@pytest.mark.parametrize("name", list(MODELS))
def test_sqnr_gram_and_direct_paths_agree(name):
    from sensitivity.base import units_for

    model, data = MODELS[name]()
    layers = mpsearch.discover(model)[0]
    opts = [mpsearch.parse_option(o) for o in OPTIONS]
    gram = noise_ratios(model, data, units_for(model, layers), opts, RTN(), method="gram")
    direct = noise_ratios(model, data, units_for(model, layers), opts, RTN(), method="direct")
    assert gram["layer"].tolist() == direct["layer"].tolist()
    torch.testing.assert_close(
        torch.tensor(gram["output_nsr"].to_numpy()), torch.tensor(direct["output_nsr"].to_numpy()), rtol=1e-4, atol=0
    )


def test_gram_statistics_only_where_they_fit_in_the_weights_memory_and_save_time():
    x = torch.zeros(4096, 512)  # 4096 calibration tokens per batch
    square = torch.zeros(512, 512)
    assert use_gram(x, square, n_options=8, n_batches=4)
    assert not use_gram(x, square.bfloat16(), n_options=8, n_batches=4)  # G (fp32) would be 2x a bf16 weight
    down = torch.zeros(128, 512)  # in = 4x out: G is 4x the weight's bytes
    assert not use_gram(x, down, n_options=8, n_batches=4)
    assert not use_gram(x[:16], square, n_options=8, n_batches=1)  # 16 tokens: products cost less than G
