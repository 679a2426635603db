"""experiments/bench_llamacpp.py's bookkeeping without llama.cpp: rows survive a restart (the run resumes), and
each plan is compared with the right recipes (same size with an imatrix; the best of no larger size)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import bench_llamacpp as bench  # noqa: E402


def _recipe(results, name, bpw, ppl, imatrix, embd=None):
    key = f"recipe/{name}/{embd or 'default'}/{'imatrix' if imatrix else 'plain'}"
    results.add(key=key, phase="recipes", recipe=name, token_embedding=embd, imatrix=imatrix, bpw=bpw, perplexity=ppl)


def test_rows_resume_and_plans_are_compared_with_the_right_recipes(tmp_path):
    path = tmp_path / "results.jsonl"
    results = bench.Results(path)
    results.add(
        key="f32", phase="recipes", recipe="F32", token_embedding=None, imatrix=False, bpw=32.0, perplexity=10.0
    )
    _recipe(results, "Q4_0", 4.5, 13.0, False)
    _recipe(results, "Q4_0", 4.5, 12.0, True)
    _recipe(results, "IQ4_XS", 4.4, 11.0, True, "iq4_nl")
    results.add(key="plan/all/4.5000", phase="plans", plan_set="all", budget_bpw=4.5, bpw=4.5, perplexity=11.5,
                types={})  # fmt: skip
    results.add(key="plan/no-grid-iq/4.5000", phase="plans", plan_set="no-grid-iq", budget_bpw=4.5, bpw=4.5,
                perplexity=12.5, types={})  # fmt: skip
    results.add(key="plan/all/3.0000", phase="plans", plan_set="all", budget_bpw=3.0, infeasible="needs 4.13")
    again = bench.Results(path)  # a new process reads what the last one wrote
    assert again.done("recipe/Q4_0/default/imatrix")["perplexity"] == 12.0 and again.done("recipe/Q8_0") is None
    row, fewer = bench.summary(again)  # the infeasible budget is no comparison
    assert row["plan_set"] == "all" and fewer["plan_set"] == "no-grid-iq"
    assert fewer["beats_same_size_imatrix_recipes"] is False  # 12.5 > 12.0
    assert row["beats_same_size_imatrix_recipes"] is True  # 11.5 < 12.0 (Q4_0 + imatrix at 4.5)
    assert row["best_recipe_no_larger"] == "IQ4_XS+imatrix embd iq4_nl"  # 11.0 at 4.4, not plain Q4_0
    assert abs(row["increase_ratio_vs_best"] - 1.5) < 1e-12  # (11.5 - 10) / (11.0 - 10)
    table = bench.markdown(again)
    assert "| Q4_0 | 4.50 | 13.00 | 12.00 | 11.50 (4.50) | lower; increase x0.75 | 12.50 (4.50) |" in table


def test_rows_another_llama_build_measured_are_measured_again_and_left_out(tmp_path):
    path = tmp_path / "results.jsonl"
    old = bench.Results(path, build="aaaa")
    _recipe(old, "Q4_0", 4.5, 12.0, True)
    old.add(key="table/13types", phase="table", ratio=2.0)  # mpsearch's own timing: no llama.cpp in it
    assert bench.Results(path, build="aaaa").done("recipe/Q4_0/default/imatrix")["build"] == "aaaa"
    new = bench.Results(path, build="bbbb")
    assert new.done("recipe/Q4_0/default/imatrix") is None and new.done("table/13types") is not None
    _recipe(new, "Q4_0", 4.5, 12.1, True)
    again = bench.Results(path, build="bbbb")
    assert [r["perplexity"] for r in again.rows if r["phase"] == "recipes"] == [12.1]
    assert len(path.read_text().splitlines()) == 3  # the other build's row is kept in the file


def test_phases_measured_again_count_only_their_new_rows_and_the_newest_row_wins(tmp_path):
    path = tmp_path / "results.jsonl"
    first = bench.Results(path)
    first.add(key="table/13types", phase="table", ratio=2.0)
    first.add(key="speed/cpu/imatrix", phase="speed", total_s=100.0)
    again = bench.Results(path, again=frozenset({"table"}))  # after a change to mpsearch's code
    assert again.done("table/13types") is None  # measured anew, though a row exists
    assert again.done("speed/cpu/imatrix")["total_s"] == 100.0  # the other phases resume as before
    again.add(key="table/13types", phase="table", ratio=1.4)
    assert again.done("table/13types")["ratio"] == 1.4
    assert bench.Results(path).done("table/13types")["ratio"] == 1.4  # the newest row counts in a later run
    assert len(path.read_text().splitlines()) == 3  # the earlier measurement stays in the file
    # keys are not phases ("plan/..." rows are phase "plans"), and re-reading the file keeps this run's rows
    first.add(key="plan/all/4.5000", phase="plans", perplexity=21.5)
    plans = bench.Results(path, again=frozenset({"plans"}))
    assert plans.done("plan/all/4.5000") is None
    plans.add(key="plan/all/4.5000", phase="plans", perplexity=21.4)
    plans.reload()
    assert plans.done("plan/all/4.5000")["perplexity"] == 21.4


def test_the_checks_exit_status_counts_exactly_the_lines_marked_not_ok(capsys):
    """CI's llama.cpp job once failed on a gap that its own log line marked ok (the exit status tested another
    number): each check line's ``ok`` is now the one thing counted."""
    import json

    import check_llamacpp

    assert check_llamacpp.verdict(check="a", relative_gap=0.9, ok=True) == 0
    assert check_llamacpp.verdict(check="b", relative_gap=0.0, ok=False) == 1
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(line["check"], line["ok"]) for line in lines] == [("a", True), ("b", False)]
