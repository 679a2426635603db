"""Pareto exploration: the API front on a real model, plan_at, plot, and the `mpsearch pareto` command."""

import json

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

import mpsearch  # noqa: E402
from mpsearch.cli import main  # noqa: E402


def test_api_front_plan_at_and_plot(digits):
    front = mpsearch.pareto(digits.model, digits.calibration, estimator="sqnr", loss_fn="kl", axis="size_bytes")
    frame = front.to_frame()
    assert len(frame) >= 10
    assert frame["size_bytes"].is_monotonic_increasing and frame["damage"].is_monotonic_decreasing
    uniform = front.meta["uniform"]
    for option, (size, damage) in uniform.items():  # no uniform plan beats the front at its own size
        at = frame[frame["size_bytes"] <= size + 1e-9]["damage"].min()
        assert at <= damage + 1e-12, option
    limit = float(frame["size_bytes"].median())
    plan = front.plan_at(size_bytes=limit)
    assert mpsearch.plan_size(digits.model, plan)["size_bytes"] <= limit + 1
    with pytest.raises(mpsearch.MpsearchError, match="no point of the front"):
        front.plan_at(size_bytes=1)
    fig, ax = plt.subplots()
    assert front.plot(ax=ax) is ax
    assert len(ax.collections) >= 1 + len(uniform)  # front scatter and one marker per uniform option
    plt.close(fig)


def test_api_sampled_front_points_lie_on_the_complete_front(digits):
    full = mpsearch.pareto(digits.model, digits.calibration, estimator="sqnr", loss_fn="kl")
    sampled = mpsearch.pareto(digits.model, digits.calibration, estimator="sqnr", loss_fn="kl", budgets=5)
    assert sampled.meta["exact"] and not sampled.meta["complete"] and full.meta["complete"]
    complete = full.to_frame()
    for _, row in sampled.to_frame().iterrows():  # each sampled point is the optimum at its own size
        best = complete[complete["size_bytes"] <= row.size_bytes + 1e-6]["damage"].min()
        assert row.damage == pytest.approx(best, rel=1e-9)


def test_cli_pareto_writes_csv_and_png(tmp_path, capsys):
    out, png = tmp_path / "front.csv", tmp_path / "front.png"
    code = main(
        [
            "pareto",
            "--model",
            "digits-cnn",
            "--estimator",
            "sqnr",
            "--out",
            str(out),
            "--plot",
            str(png),
            "--measure",
            "3",
        ]
    )
    assert code == 0
    frame = pd.read_csv(out)
    assert {"plan_id", "size_bytes", "damage", "metric"} <= set(frame.columns)
    assert frame["metric"].notna().sum() == 3
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["points"] == len(frame)
