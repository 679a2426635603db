"""CLI end to end on digits-cnn (fast), and every bad-input path: one line, exit code 2, no traceback."""

import json

import pytest

from mpsearch.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def digits_plan(tmp_path_factory):
    path = tmp_path_factory.mktemp("plans") / "plan.json"
    assert main(["search", "--model", "digits-cnn", "--avg-bits", "4.0", "--out", str(path)]) == 0
    return path


def test_search_prints_plan_table_and_writes_json(digits_plan, capsys, tmp_path):
    code, out, _ = run(
        capsys,
        "search",
        "--model",
        "digits-cnn",
        "--avg-bits",
        "4.5",
        "--out",
        str(tmp_path / "p.json"),
        "--table",
        str(tmp_path / "t.parquet"),
    )
    assert code == 0
    assert "features.0" in out and "classifier.2" in out
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["avg_bits"] <= 4.5
    # the solver's optimum, unless the measured check returned a better plan (then merely feasible)
    assert summary["status"] == ("optimal" if summary["safety"]["chosen"] == "searched" else "feasible")
    plan = json.loads((tmp_path / "p.json").read_text())
    assert set(plan["plan"]) == {"features.0", "features.2", "features.5", "classifier.0", "classifier.2"}
    assert plan["provenance"]["model"] == "digits-cnn"
    assert (tmp_path / "t.parquet").stat().st_size > 0


def test_evaluate_beats_uniform_baseline_of_no_larger_size(digits_plan, capsys):
    code, out, _ = run(capsys, "evaluate", "--model", "digits-cnn", "--plan", str(digits_plan))
    assert code == 0
    line = json.loads(out.strip().splitlines()[-1])
    assert set(line) == {
        "model",
        "avg_bits",
        "size_bytes",
        "metric_name",
        "metric",
        "higher_is_better",
        "uniform_option",
        "quantizer",
        "uniform_avg_bits",
        "uniform_metric",
        "runtime_inputs",
    }
    assert line["runtime_inputs"] is False and line["avg_bits"] <= 4.0
    assert line["uniform_avg_bits"] <= line["avg_bits"]
    assert line["metric_name"] == "neg_kl"
    assert line["metric"] >= line["uniform_metric"]


def _error(capsys, *argv):
    code, out, err = run(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()  # progress lines may come first; the error is the one last line
    assert lines[-1].startswith("mpsearch: error: ") and "Traceback" not in err
    assert sum("error" in line for line in lines) == 1
    return lines[-1]


def test_bad_inputs_give_one_line_errors(digits_plan, capsys, tmp_path):
    assert "unknown model 'resnet9'" in _error(capsys, "search", "--model", "resnet9")
    assert "unknown option 'int4x'" in _error(capsys, "search", "--model", "digits-cnn", "--options", "int4x,int8")
    msg = _error(capsys, "search", "--model", "digits-cnn", "--avg-bits", "1.5")
    assert "budget 1.5 avg bits is infeasible: the smallest plan with these options needs 2.327" in msg
    assert "raise avg_bits to at least 2.327" in msg
    assert "unknown estimator" in _error(capsys, "search", "--model", "digits-cnn", "--estimator", "magic")
    assert "not a positive number" in _error(capsys, "search", "--model", "digits-cnn", "--avg-bits", "-2")
    # a plan made for another model
    msg = _error(capsys, "evaluate", "--model", "minilm-l6", "--plan", str(digits_plan))
    assert "was made for model 'digits-cnn', not 'minilm-l6'" in msg
    # a plan naming a layer the model does not have
    data = json.loads(digits_plan.read_text())
    data["provenance"] = {}
    data["plan"]["features.9"] = "int4"
    (tmp_path / "extra.json").write_text(json.dumps(data))
    assert "plan layer 'features.9' is not a quantizable layer" in _error(
        capsys, "evaluate", "--model", "digits-cnn", "--plan", str(tmp_path / "extra.json")
    )
    # truncated / corrupt plan file
    (tmp_path / "cut.json").write_text(digits_plan.read_text()[:40])
    assert "is not valid JSON" in _error(
        capsys, "evaluate", "--model", "digits-cnn", "--plan", str(tmp_path / "cut.json")
    )
    assert "does not exist" in _error(
        capsys, "evaluate", "--model", "digits-cnn", "--plan", str(tmp_path / "none.json")
    )
    assert "required" in _error(capsys, "search")
    # parameters: wrong JSON, wrong names and values, patterns matching nothing
    assert "--estimator-params is not valid JSON" in _error(
        capsys, "search", "--model", "digits-cnn", "--estimator-params", "{max_probes: 4}"
    )
    msg = _error(
        capsys, "search", "--model", "digits-cnn", "--estimator", "hessian", "--estimator-params", '{"probes": 4}'
    )
    assert "estimator 'hessian' has no parameter 'probes'; its parameters are method, min_probes" in msg
    msg = _error(capsys, "search", "--model", "digits-cnn", "--solver", "ilp", "--solver-params", '{"backend": "x"}')
    assert "solver 'ilp': parameter 'backend' must be one of 'cbc', 'highs', 'cpsat', got 'x'" in msg
    assert "exclude pattern 'lm_head' matches no quantizable layer" in _error(
        capsys, "search", "--model", "digits-cnn", "--exclude", "lm_head"
    )


def test_search_with_parameters_and_layer_patterns(capsys, tmp_path):
    path = tmp_path / "p.json"
    code, out, _ = run(
        capsys,
        "search",
        "--model",
        "digits-cnn",
        "--estimator",
        "hessian",
        "--estimator-params",
        '{"min_probes": 2, "max_probes": 2}',
        "--exclude",
        "classifier.*",
        "--avg-bits",
        "4.5",
        "--out",
        str(path),
    )
    assert code == 0
    plan = json.loads(path.read_text())["plan"]
    assert set(plan) == {"features.0", "features.2", "features.5"}  # the classifier stays in full precision


@pytest.mark.parametrize("estimator", ["sqnr", "hessian", "fisher", "entropy", "relevance", "measured"])
def test_every_estimator_works_from_the_cli(estimator, capsys, tmp_path):
    code, out, _ = run(capsys, "search", "--model", "digits-cnn", "--estimator", estimator, "--avg-bits", "4")
    assert code == 0
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["avg_bits"] <= 4.0
    assert summary["status"] == ("optimal" if summary["safety"]["chosen"] == "searched" else "feasible")


def test_evolutionary_from_the_cli(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, _ = run(capsys, "search", "--model", "digits-cnn", "--solver", "evolutionary", "--trials", "4")
    assert code == 0
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["gap"] is None and summary["avg_bits"] <= 4.0
    assert (tmp_path / "runs" / "evolutionary" / "evolutionary.db").exists()


@pytest.mark.parametrize("command", ["search", "pareto", "evaluate"])
def test_device_flag_rejects_unknown_and_absent_devices(command, capsys, digits_plan):
    import torch

    extra = {"search": ["--avg-bits", "4"], "pareto": ["--out", "f.csv"], "evaluate": ["--plan", str(digits_plan)]}
    base = [command, "--model", "digits-cnn", *extra[command]]
    code, _, err = run(capsys, *base, "--device", "tpu9")
    assert code == 2 and "unknown device 'tpu9'" in err and "Traceback" not in err
    if not torch.cuda.is_available():
        code, _, err = run(capsys, *base, "--device", "cuda")
        assert code == 2 and "device 'cuda' is not available on this machine" in err


def test_device_flag_loads_the_zoo_model_there(capsys, digits_plan):
    code, out, err = run(capsys, "evaluate", "--model", "digits-cnn", "--plan", str(digits_plan), "--device", "cpu")
    assert code == 0 and "on cpu" in err and json.loads(out.strip().splitlines()[-1])["avg_bits"] <= 4.0


def test_help_lists_the_registries_without_importing_torch():
    import subprocess
    import sys

    from mpsearch.models import ZOO
    from mpsearch.names import ESTIMATOR_NAMES, SOLVER_NAMES, TARGET_NAMES, ZOO_NAMES
    from mpsearch.runtimes import RUNTIMES

    assert TARGET_NAMES == tuple(RUNTIMES)
    from sensitivity import REGISTRY as ESTIMATORS
    from solvers import REGISTRY as SOLVERS

    assert ZOO_NAMES == tuple(ZOO) and ESTIMATOR_NAMES == tuple(sorted(ESTIMATORS))
    assert SOLVER_NAMES == tuple(sorted(SOLVERS))
    code = "import sys; from mpsearch.cli import main\ntry: main(['search', '--help'])\nexcept SystemExit: pass\n"
    code += "print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip().endswith("False") and "digits-cnn" in done.stdout
