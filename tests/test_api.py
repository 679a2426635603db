import pytest
import torch

import mpsearch
from mpsearch.core import InfeasibleBudgetError, MpsearchError


def test_search_evaluate_round_trip_on_a_user_model(digits):
    result = mpsearch.search(digits.model, digits.calibration, mpsearch.Budget(avg_bits=4.0), loss_fn="kl")
    assert result.constraints["avg_bits"].value <= 4.0
    assert result.status == "optimal"
    table = result.extra["table"]
    assert result.objective == pytest.approx(result.plan.to_frame(table)["damage"].sum())
    measured = mpsearch.evaluate(digits.model, result.plan, digits.evaluation, "kl")
    assert measured["avg_bits"] == pytest.approx(result.constraints["avg_bits"].value)
    int3 = mpsearch.evaluate(digits.model, mpsearch.uniform_plan(digits.model, "int3"), digits.evaluation, "kl")
    assert measured["metric"] > int3["metric"]
    fp = mpsearch.evaluate(digits.model, mpsearch.uniform_plan(digits.model, "fp16"), digits.evaluation, "kl")
    assert fp["metric"] > measured["metric"] and fp["loss"] < 1e-5


def test_search_accepts_zoo_names_and_solver_choice():
    dp = mpsearch.search("digits-cnn", budget=mpsearch.Budget(avg_bits=5.0), solver="dp")
    ilp = mpsearch.search("digits-cnn", budget=mpsearch.Budget(avg_bits=5.0), solver="ilp")
    default = mpsearch.search("digits-cnn", budget=mpsearch.Budget(avg_bits=5.0))
    assert dp.objective == pytest.approx(ilp.objective, rel=1e-9)
    assert default.plan.provenance["solver"] == "core" and default.objective == pytest.approx(dp.objective, rel=1e-9)
    assert dp.plan.provenance["model"] == "digits-cnn"


def test_search_fails_fast_and_clearly(digits):
    with pytest.raises(InfeasibleBudgetError, match="needs 3.107"):
        mpsearch.search(digits.model, digits.calibration, mpsearch.Budget(avg_bits=2.0))
    with pytest.raises(MpsearchError, match="no calibration data"):
        mpsearch.search(digits.model)
    with pytest.raises(MpsearchError, match="unknown solver"):
        mpsearch.search(digits.model, digits.calibration, solver="simplex9")


def test_apply_plan_on_zoo_model_keeps_the_original(digits):
    before = {k: v.clone() for k, v in digits.model.state_dict().items()}
    q = mpsearch.apply_plan(digits.model, mpsearch.uniform_plan(digits.model, "int2"))
    assert not torch.equal(q.features[0].weight, digits.model.features[0].weight)
    assert all(torch.equal(v, before[k]) for k, v in digits.model.state_dict().items())


def test_search_under_a_bops_budget_uses_the_measured_macs(digits):
    table = mpsearch.estimate(digits.model, digits.calibration, "sqnr", loss_fn="kl", estimator_params={"progress": False})
    int4_bops = table.uniform_cost("int4", "bops")
    result = mpsearch.search(digits.model, iter(digits.calibration), mpsearch.Budget(bops=int4_bops), loss_fn="kl")
    assert result.constraints["bops"].value <= int4_bops
    assert result.constraints["bops"].value > table.uniform_cost("int3", "bops")  # the budget was used
