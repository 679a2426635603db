import pytest
import torch

import mpsearch
from mpsearch.core import InfeasibleBudgetError, MpsearchError


def test_search_evaluate_round_trip_on_a_user_model(digits):
    result = mpsearch.search(digits.model, digits.calibration, mpsearch.Budget(avg_bits=4.0), loss_fn="kl")
    assert result.constraints["avg_bits"].value <= 4.0
    assert result.status == ("optimal" if result.extra["safety"]["chosen"] == "searched" else "feasible")
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
    assert default.extra["table"].meta["estimator"] == "fisher"  # the best measured ranker (README)
    assert dp.plan.provenance["model"] == "digits-cnn"


def test_search_fails_fast_and_clearly(digits):
    with pytest.raises(InfeasibleBudgetError, match="needs 2.327"):
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
    options = ["int3", "int4", "int5", "int6", "int8"]
    table = mpsearch.estimate(
        digits.model, digits.calibration, "sqnr", options, loss_fn="kl", estimator_params={"progress": False}
    )
    int4_bops = table.uniform_cost("int4", "bops")
    budget = mpsearch.Budget(bops=int4_bops)
    result = mpsearch.search(digits.model, iter(digits.calibration), budget, options=options, loss_fn="kl")
    assert result.constraints["bops"].value <= int4_bops
    assert result.constraints["bops"].value > table.uniform_cost("int3", "bops")  # the budget was used


class CountingModel(torch.nn.Module):
    """Counts forward passes and deep copies: a wrong parameter must be refused before either happens."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)
        self.forwards = 0
        self.copies = 0

    def forward(self, x):
        self.forwards += 1
        return self.fc(x)

    def __deepcopy__(self, memo):
        self.copies += 1
        raise AssertionError("copied")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_probes": 4}, r"search\(\) has no parameter 'max_probes'; estimator parameters go in estimator_params"),
        ({"estimator_params": {"max_probes": 0}}, r"parameter 'max_probes' must be a whole number >= 1, got 0"),
        ({"estimator_params": {"probes": 4}}, r"estimator 'hessian' has no parameter 'probes'; its parameters are"),
        ({"estimator_params": {"method": "lanczos"}}, r"'method' must be one of 'hutchinson', 'hutchpp'"),
        ({"solver": "ilp", "solver_params": {"backend": "gurobi"}}, r"solver 'ilp': parameter 'backend' must be"),
        ({"solver": "evolutionary", "solver_params": {"n_trials": -1}}, r"'n_trials' must be a whole number >= 1"),
    ],
)
def test_parameters_are_validated_before_any_copy_or_forward(kwargs, message):
    model = CountingModel()
    with pytest.raises(MpsearchError, match=message):
        mpsearch.search(model, [torch.randn(2, 4)], estimator="hessian", **kwargs)
    assert model.forwards == 0 and model.copies == 0


def test_estimator_and_solver_params_reach_their_targets(digits):
    result = mpsearch.search(
        digits.model,
        digits.calibration[:1],
        mpsearch.Budget(avg_bits=5.0),
        estimator="hessian",
        solver="ilp",
        loss_fn="kl",
        estimator_params={"min_probes": 2, "max_probes": 3, "progress": False},
        solver_params={"backend": "highs"},
    )
    assert result.extra["table"].meta["params"]["max_probes"] == 3
    assert result.plan.provenance["solver_params"]["backend"] == "highs"


def test_instances_are_validated_and_not_mixed_with_params():
    import sensitivity
    import solvers
    from mpsearch.api import make_estimator, make_solver

    with pytest.raises(MpsearchError, match=r"estimator 3 is not an instance of Estimator; use one of \["):
        make_estimator(3)
    with pytest.raises(MpsearchError, match="solver_params given with a solver instance"):
        make_solver(solvers.CoreDP(), {"max_states": 4})
    with pytest.raises(MpsearchError, match=r"parameter 'max_probes' must be a whole number >= 1, got 0"):
        make_estimator(sensitivity.HessianTrace(max_probes=0))


def test_device_is_for_zoo_names_not_for_a_model_passed_in(digits):
    import mpsearch

    with pytest.raises(mpsearch.MpsearchError, match="device= is for zoo model names"):
        mpsearch.estimate(digits.model, digits.calibration[:1], "sqnr", device="cpu")
    table = mpsearch.estimate("digits-cnn", estimator="sqnr", device="cpu", cache=False)
    assert table.meta["model"] == "digits-cnn" and len(table.frame) > 0


def test_best_uniform_is_the_best_option_of_no_larger_size_that_stores_every_layer():
    import torch

    import mpsearch
    from mpsearch.api import best_uniform

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    data = [torch.randn(16, 64) for _ in range(2)]
    plan = mpsearch.BitPlan({"0": "int4", "2": "int8"})  # 4.69 bits per weight
    option, result = best_uniform(model, plan, data, ["int2", "int3", "int4", "int8"])
    assert option == "int4"  # int8 (8.25 bits) is larger; int2 and int3 are worse
    assert result == mpsearch.evaluate(model, mpsearch.BitPlan({"0": "int4", "2": "int4"}), data, progress=False)
    with_blocks, blocks = best_uniform(model, plan, data, ["int4", "int8", "q4_0"])  # q4_0: 4.5 bits, blocks of 32
    assert with_blocks == "q4_0" and blocks["loss"] < result["loss"]
    assert best_uniform(model, plan, data, ["int8"]) == (None, None)  # nothing of no larger size
