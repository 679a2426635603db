import json

import numpy as np
import pandas as pd
import pytest

from mpsearch.core import (
    BitPlan,
    Budget,
    CostTable,
    InvalidPlanError,
    InvalidTableError,
    LayerInfo,
    MpsearchError,
    cost_rows,
    parse_options,
)


def make_table(seed=0, ties=()):
    layers = [LayerInfo(f"block.{i}.fc", (16 * (i + 1), 32), "linear", macs=512 * (i + 1)) for i in range(4)]
    frame = cost_rows(layers, parse_options(["int3", "int4", "int8"]))
    frame["damage"] = np.random.default_rng(seed).random(len(frame)) / 3
    frame["damage_std"] = 0.1
    return CostTable(frame, {"estimator": "test", "seed": seed, "ties": [list(t) for t in ties]})


def test_cost_rows_compute_sizes_and_bops():
    t = make_table()
    row = t.frame[(t.frame.layer == "block.0.fc") & (t.frame.option == "int4")].iloc[0]
    assert row.n_params == 16 * 32
    assert row.bits == pytest.approx(4 + 16 / 32)
    assert row.size_bytes == np.ceil(16 * 32 * (4 + 16 / 32) / 8)
    assert row.bops == 512 * 4 * 16
    assert t.uniform_cost("int4") == pytest.approx(4.5)
    assert t.layers == [f"block.{i}.fc" for i in range(4)]


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda f: pd.concat([f, f.iloc[:1]]), "duplicate row for layer 'block.0.fc' option 'int3'"),
        (lambda f: f.assign(damage=f.damage.where(f.index != 2, np.nan)), "damage is NaN for layer 'block.0.fc'"),
        (lambda f: f.assign(size_bytes=-f.size_bytes), "negative size_bytes"),
        (lambda f: f.drop(columns="bits"), "lacks columns"),
        (lambda f: f.assign(option=f.option.str.replace("int8", "int42")), "unknown option .int42."),
        (lambda f: f.iloc[:0], "no rows"),
    ],
)
def test_table_validation(mutate, message):
    frame = make_table().frame
    with pytest.raises(MpsearchError, match=message):
        CostTable(mutate(frame.copy()), {})


def test_table_rejects_ties_to_unknown_layers():
    with pytest.raises(InvalidTableError, match="unknown layers"):
        make_table(ties=[("block.0.fc", "nope")])


def test_parquet_round_trip_is_exact(tmp_path):
    t = make_table(ties=[("block.0.fc", "block.1.fc")])
    t.frame.loc[0, "damage"] = 0.1 + 0.2  # not representable in short decimal form
    t.meta["params"] = {"n": 3, "tol": 1e-3}
    t.to_parquet(tmp_path / "t.parquet")
    back = CostTable.from_parquet(tmp_path / "t.parquet")
    pd.testing.assert_frame_equal(back.frame, t.frame, check_exact=True)
    assert back.meta == t.meta
    assert back.fingerprint() == t.fingerprint()
    t.to_csv(tmp_path / "t.csv")
    assert pd.read_csv(tmp_path / "t.csv").shape == t.frame.shape


def test_corrupt_parquet_gives_clear_error(tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(InvalidTableError, match="cannot read cost table"):
        CostTable.from_parquet(tmp_path / "bad.parquet")


def test_plan_json_round_trip_is_exact(tmp_path):
    plan = BitPlan(
        {"a.b": "int4", "a.c": "fp8_e4m3"}, {"solver": "dp", "objective": 0.1 + 0.2, "budget": {"avg_bits": 4.0}}
    )
    plan.save(tmp_path / "p.json")
    back = BitPlan.load(tmp_path / "p.json")
    assert back == plan
    assert back.provenance["objective"] == 0.1 + 0.2
    assert list(back) == ["a.b", "a.c"]


def test_plan_to_frame_joins_realized_costs():
    t = make_table()
    plan = BitPlan({name: "int8" for name in t.layers})
    frame = plan.to_frame(t)
    assert list(frame.columns[:2]) == ["layer", "option"]
    assert frame["bits"].tolist() == pytest.approx([8 + 16 / 32] * 4)


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"schema_version": 1, "plan": {"a": "int4", "b": "int', "not valid JSON"),
        ('{"schema_version": 1}', "no 'plan' object"),
        ('{"schema_version": 99, "plan": {"a": "int4"}}', "schema_version 99"),
        ('{"schema_version": 1, "plan": {"a": "int4", "b": "int17"}}', "plan entry 'b': unknown option 'int17'"),
        ('{"schema_version": 1, "plan": {}}', "no layers"),
    ],
)
def test_plan_load_errors_name_the_problem(text, message):
    with pytest.raises(InvalidPlanError, match=message):
        BitPlan.from_json(text)


def test_plan_layer_checks_name_the_first_offender():
    plan = BitPlan({"x": "int4", "y": "int4"})
    with pytest.raises(InvalidPlanError, match="plan layer 'y' is not a quantizable layer"):
        plan.check_layers(["x", "z"])
    with pytest.raises(InvalidPlanError, match="no option for layer 'z'"):
        plan.check_layers(["x", "y", "z"])
    plan.check_layers(["x", "y", "z"], require_all=False)


def test_budget_validation_and_constraints():
    with pytest.raises(MpsearchError, match="no constraint"):
        Budget()
    with pytest.raises(MpsearchError, match="not a positive number"):
        Budget(avg_bits=-1)
    t = make_table()
    cons = {c.name: c for c in Budget(avg_bits=4, size_bytes=1000, bops=1e6).constraints(t.frame)}
    assert cons["avg_bits"].limit == 4 * t.total_params()
    np.testing.assert_array_equal(cons["size_bytes"].row_cost, t.frame["size_bytes"].to_numpy())
    with pytest.raises(MpsearchError, match="needs table column 'latency'"):
        Budget(latency=1.0).constraints(t.frame)
    no_macs = t.frame.assign(bops=np.nan)
    with pytest.raises(MpsearchError, match="MACs"):
        Budget(bops=1.0).constraints(no_macs)
    assert json.loads(json.dumps(Budget(avg_bits=3, ties=[["a", "b"]]).to_dict())) == {
        "avg_bits": 3.0,
        "ties": [["a", "b"]],
    }


def test_cost_rows_match_each_options_own_storage_rule():
    import math

    from mpsearch.core import LayerInfo, cost_rows, parse_options

    layers = [
        LayerInfo("a", (96, 130), "linear", macs=96 * 130),  # rows that groups do not divide
        LayerInfo("b", (16, 3, 3, 3), "conv2d", macs=None),
        LayerInfo("c", (7,), "linear", macs=0),
        LayerInfo("d", (1000, 64), "embedding"),
    ]
    opts = parse_options(["int4", "int3_g32_asym", "int4_g128", "fp8_e4m3", "fp4_e2m1", "fp16"])
    frame = cost_rows(layers, opts)
    assert frame[["layer", "option"]].values.tolist() == [[la.name, o.name] for la in layers for o in opts]
    for row, (layer, opt) in zip(frame.itertuples(), ((la, o) for la in layers for o in opts)):
        storage = opt.storage_bits(layer.shape)
        assert row.n_params == math.prod(layer.shape)
        assert row.bits == storage / row.n_params and row.size_bytes == math.ceil(storage / 8)
        assert (row.bops == layer.macs * opt.bits * 16) if layer.macs else np.isnan(row.bops)
    assert opts[1].storage_bits((96, 130)) == 96 * 130 * 3 + 96 * 5 * (16 + 3)  # ceil(130 / 32) = 5 groups
