"""Every registered estimator on the models users bring: a CNN, and random-init transformers BERT, Llama
(SDPA attention) and GPT-2 as they come. Parametrized from the registries (mpsearch.testing)."""

import pytest
import torch

from mpsearch.testing import check_estimator, estimator_instances, tiny_transformers

ESTIMATORS = estimator_instances()
MODELS = tiny_transformers()


@pytest.fixture(scope="module", params=["digits-cnn", *MODELS])
def model_and_data(request, digits):
    if request.param == "digits-cnn":
        return digits.model, digits.calibration[:1]
    return MODELS[request.param]()


def test_registry_is_covered():
    import sensitivity

    assert {e.name for e in ESTIMATORS} == set(sensitivity.REGISTRY)


@pytest.mark.parametrize("estimator", ESTIMATORS, ids=lambda e: e.name)
def test_every_estimator_on_every_model_kind(estimator, model_and_data):
    model, data = model_and_data
    model.train()  # the caller's mode must survive, whatever it is
    try:
        check_estimator(estimator, model, data)
    finally:
        model.eval()


@pytest.mark.parametrize("name", list(MODELS))
def test_hessian_goes_through_sdpa_without_touching_the_attention_setting(name):
    from sensitivity import HessianTrace

    model, data = MODELS[name]()
    before = model.config._attn_implementation
    table = HessianTrace(min_probes=2, max_probes=2, progress=False).estimate(model, data, ["int4"], cache=False)
    assert (table.frame["hessian_trace"] != 0).all()
    assert model.config._attn_implementation == before
    # the same double backward outside the estimator fails in the fused CPU kernel: the estimator's switch
    # to the math kernel is what makes it work
    params = [p for p in model.parameters() if p.dim() == 2][1:2]
    out = model(**data[0])
    logits = out.logits if hasattr(out, "logits") else out.last_hidden_state
    (g,) = torch.autograd.grad(logits.float().pow(2).sum(), params, create_graph=True)
    with pytest.raises(RuntimeError, match="not implemented"):
        torch.autograd.grad(g.sum(), params)


@pytest.mark.parametrize("name", list(MODELS))
def test_fitness_and_evolutionary_search_on_transformers_models(name):
    import mpsearch
    from mpsearch.fitness import PlanFitness

    model, data = MODELS[name]()
    plan = mpsearch.uniform_plan(model, "int4")
    fitness = PlanFitness(model, data)
    assert fitness(plan) == pytest.approx(mpsearch.evaluate(model, plan, data)["loss"], rel=1e-5)
    assert fitness(mpsearch.uniform_plan(model, "int8")) < fitness(plan)
    budget = mpsearch.Budget(avg_bits=6.0)
    result = mpsearch.search(
        model,
        data,
        budget,
        solver="evolutionary",
        options=["int4", "int8"],
        solver_params={"n_trials": 3, "storage": ":memory:"},
    )
    assert result.constraints["avg_bits"].value <= 6.0 and result.extra["fitness"] <= result.extra["start_fitness"]
