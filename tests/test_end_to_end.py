"""The spine's acceptance check on every zoo model: search at 4 avg bits, then evaluate; the mixed plan is at
least as good as the best uniform option of no larger size."""

import json

import pytest

from mpsearch.cli import main


@pytest.mark.parametrize("model", ["digits-cnn", "minilm-l6", "efficientnet-lite0"])
def test_search_then_evaluate_beats_uniform(model, tmp_path, capsys):
    plan = tmp_path / "plan.json"
    assert main(["search", "--model", model, "--avg-bits", "4.0", "--out", str(plan)]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--model", model, "--plan", str(plan)]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["model"] == model
    assert line["avg_bits"] <= 4.0
    assert line["uniform_option"] is not None and line["uniform_avg_bits"] <= line["avg_bits"]
    assert line["metric"] >= line["uniform_metric"]
