"""Bad input and faults, as a new user makes them: every case is a one-line error (CLI: exit code 2, no
traceback; API: MpsearchError with a one-line message) and no file the user had is changed or lost."""

import json

import pytest
import torch

import mpsearch
from mpsearch.cli import main
from mpsearch.core import BitPlan, Budget, CostTable, MpsearchError

PLAN = {"schema_version": 1, "plan": {"features.0": "int8"}, "provenance": {"model": "digits-cnn"}}
FILES = {
    "plan.json": json.dumps(PLAN),
    "broken.json": '{"plan": {"a": ',
    "noplan.json": json.dumps({"schema_version": 1}),
    "badopt.json": json.dumps({"schema_version": 1, "plan": {"fc": "int9"}, "provenance": {}}),
    "other.json": json.dumps({"schema_version": 1, "plan": {"fc": "int8"}, "provenance": {"model": "minilm-l6"}}),
    "grid.toml": 'models = ["digits-cnn"]\nestimators = ["sqnr"]\nsolvers = ["dp"]\nbudgets = []\n',
    "notoml.toml": "models = [\n",
    "ok.toml": 'models = ["digits-cnn"]\nestimators = ["sqnr"]\nsolvers = ["dp"]\nbudgets = [{avg_bits = 4.0}]\n',
    "table.parquet": "not parquet",
    "binary.json": b"\x89PNG\r\n\x1a\n\xff\xfe binary",
}

CLI_CASES = [
    (["search"], "the following arguments are required: --model"),
    (["search", "--model", "resnet-9000"], "resnet-9000"),
    (["search", "--model", "digits-cnn", "--estimator", "magic"], "magic"),
    (["search", "--model", "digits-cnn", "--solver", "magic"], "magic"),
    (["search", "--model", "digits-cnn", "--avg-bits", "-1"], "avg_bits"),
    (["search", "--model", "digits-cnn", "--avg-bits", "abc"], "invalid float value"),
    (["search", "--model", "digits-cnn", "--size-bytes", "0"], "size_bytes"),
    (["search", "--model", "digits-cnn", "--bops", "-5"], "bops"),
    (["search", "--model", "digits-cnn", "--avg-bits", "1.0"], "infeasible"),
    (["search", "--model", "digits-cnn", "--options", "int9"], "int9"),
    (["search", "--model", "digits-cnn", "--options", "int4,int4"], "duplicate"),
    (["search", "--model", "digits-cnn", "--options", ""], "option"),
    (["search", "--model", "digits-cnn", "--estimator-params", "{bad"], "--estimator-params"),
    (["search", "--model", "digits-cnn", "--estimator-params", "[1]"], "--estimator-params"),
    (["search", "--model", "digits-cnn", "--estimator-params", '{"nope": 1}'], "has no parameter 'nope'"),
    (["search", "--model", "digits-cnn", "--solver-params", '{"nope": 1}'], "nope"),
    (["search", "--model", "digits-cnn", "--solver", "evolutionary", "--trials", "0"], "n_trials"),
    (["search", "--model", "digits-cnn", "--refine", "-2"], "refine=-2"),
    (["search", "--model", "digits-cnn", "--quantizer", "awq"], "invalid choice: 'awq'"),
    (["search", "--model", "digits-cnn", "--target", "onnx"], "unknown target 'onnx'"),
    (["search", "--model", "digits-cnn", "--target", "llama.cpp", "--options", "int4"], "not a llama.cpp option"),
    (["search", "--model", "digits-cnn", "--target", "gptqmodel", "--options", "int5_g32"], "no 5-bit"),
    (["search", "--model", "digits-cnn", "--device", "tpu9"], "tpu9"),
    (["search", "--model", "digits-cnn", "--include", "nothing.matches"], "matches no quantizable layer"),
    (["search", "--model", "digits-cnn", "--options", "fp8_e4m3", "--quantizer", "gptq"], "cannot quantize"),
    (["evaluate", "--model", "digits-cnn", "--plan", "missing.json"], "missing.json"),
    (["evaluate", "--model", "digits-cnn", "--plan", "broken.json"], "broken.json"),
    (["evaluate", "--model", "digits-cnn", "--plan", "noplan.json"], "noplan.json"),
    (["evaluate", "--model", "digits-cnn", "--plan", "badopt.json"], "int9"),
    (["evaluate", "--model", "digits-cnn", "--plan", "other.json"], "made for model 'minilm-l6'"),
    (["evaluate", "--model", "resnet-9000", "--plan", "plan.json"], "resnet-9000"),
    (["evaluate", "--plan", "plan.json"], "the following arguments are required: --model"),
    (["evaluate", "--model", "digits-cnn", "--plan", "plan.json", "--runtime-inputs"], "int8, whose runtime"),
    (["pareto", "--model", "digits-cnn"], "writes nothing without --out or --plot"),
    (["pareto", "--model", "digits-cnn", "--out", "f.csv", "--axis", "volume"], "volume"),
    (["pareto", "--model", "digits-cnn", "--out", "f.csv", "--measure", "-4"], "--measure -4 is negative"),
    (["pareto", "--model", "digits-cnn", "--plot", "front"], "cannot write a 'file without an extension'"),
    (["pareto", "--model", "digits-cnn", "--out", "f.csv", "--budgets", "0"], "budgets"),
    (["export", "plan.json"], "export needs --target"),
    (["search", "--model", "digits-cnn", "--include", "re:[a"], "not a valid regular expression"),
    (["export", "binary.json", "--target", "json"], "is not UTF-8 text"),
    (["export", "plan.json", "--target", "json", "--format", "hqq"], "contradict each other"),
    (["search", "--model", "digits-cnn", "--device", "meta"], "device 'meta' cannot run a search"),
    (["export", "plan.json", "--target", "onnx"], "unknown target 'onnx'"),
    (["export", "missing.json", "--target", "json"], "missing.json"),
    (["export", "broken.json", "--target", "json"], "broken.json"),
    (["export", "plan.json", "--target", "llama.cpp"], "which llama.cpp cannot store"),
    (["export", "plan.json", "--target", "torchao"], "which torchao cannot store"),
    (["export", "plan.json", "--target", "hqq"], "which hqq cannot store"),
    (["export", "plan.json", "--target", "gptqmodel"], "which gptqmodel cannot store"),
    (["export", "plan.json", "--target", "json", "--arch", "llama"], "--arch is for --target llama.cpp"),
    (["export", "plan.json", "--target", "json", "--out", "no/such/dir/x.json"], "cannot write no/such/dir/x.json"),
    (["export", "plan.json", "--target", "json", "--out", "plan.json/x"], "cannot write plan.json/x"),
    (["batch", "missing.toml"], "does not exist"),
    (["batch", "notoml.toml"], "is not valid TOML"),
    (["batch", "grid.toml"], "budgets must be a non-empty list"),
    (["batch", "ok.toml", "--run-dir", "plan.json"], "batch run dir plan.json is a file, not a directory"),
    (
        ["batch", "ok.toml", "--run-dir", "/proc/mpsearch-run"],
        "batch run dir /proc/mpsearch-run: cannot write /proc/mpsearch-run: No such",
    ),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    ([], "the following arguments are required: command"),
]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    for name, text in FILES.items():
        (tmp_path / name).write_bytes(text if isinstance(text, bytes) else text.encode())
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize(("argv", "message"), CLI_CASES, ids=[" ".join(a)[:60] or "empty" for a, _ in CLI_CASES])
def test_cli_bad_input_is_one_line_and_touches_no_file(argv, message, workdir, capsys):
    before = {p.name: p.read_bytes() for p in workdir.iterdir()}
    code = main(argv)
    out, err = capsys.readouterr()
    error_lines = [line for line in err.splitlines() if line.startswith("mpsearch: error:")]
    assert code == 2, err
    assert len(error_lines) == 1 and message in error_lines[0], err
    assert "Traceback" not in err
    assert {p.name: p.read_bytes() for p in workdir.iterdir() if p.name in before} == before


def _linear():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))


DATA = [torch.randn(4, 8)]
API_CASES = {
    "estimate: not a module": lambda: mpsearch.estimate("resnet-9000x", DATA),
    "estimate: a dict model": lambda: mpsearch.estimate({"w": 1}, DATA),
    "estimate: no data": lambda: mpsearch.estimate(_linear(), None),
    "estimate: empty data": lambda: mpsearch.estimate(_linear(), []),
    "estimate: one tensor, not batches": lambda: mpsearch.estimate(_linear(), torch.randn(4, 8)),
    "estimate: unknown estimator": lambda: mpsearch.estimate(_linear(), DATA, "magic"),
    "estimate: unknown loss": lambda: mpsearch.estimate(_linear(), DATA, "sqnr", loss_fn="mse2"),
    "estimate: loss not callable": lambda: mpsearch.estimate(_linear(), DATA, "sqnr", loss_fn=3),
    "estimate: bad option": lambda: mpsearch.estimate(_linear(), DATA, "sqnr", ["int4", "int99"]),
    "estimate: no options": lambda: mpsearch.estimate(_linear(), DATA, "sqnr", []),
    "estimate: unknown quantizer": lambda: mpsearch.estimate(_linear(), DATA, "sqnr", quantizer="awq"),
    "estimate: unknown target": lambda: mpsearch.estimate(_linear(), DATA, "sqnr", target="onnx"),
    "estimate: device for a module": lambda: mpsearch.estimate(_linear(), DATA, "sqnr", device="cpu"),
    "estimate: unknown keyword": lambda: mpsearch.estimate(_linear(), DATA, "sqnr", budget=3),
    "estimate: bad estimator param": lambda: mpsearch.estimate(
        _linear(), DATA, "hessian", estimator_params={"max_probes": 0}
    ),
    "estimate: nothing quantizable": lambda: mpsearch.estimate(torch.nn.Sequential(torch.nn.ReLU()), DATA),
    "search: infeasible": lambda: mpsearch.search(_linear(), DATA, Budget(avg_bits=1.0), "sqnr"),
    "search: refine is a bool": lambda: mpsearch.search(_linear(), DATA, estimator="sqnr", refine=True),
    "search: unknown solver": lambda: mpsearch.search(_linear(), DATA, solver="magic"),
    "search: gptq with fp8": lambda: mpsearch.search(
        _linear(), DATA, estimator="sqnr", options=["fp8_e4m3"], quantizer="gptq"
    ),
    "budget: negative": lambda: Budget(avg_bits=-2),
    "budget: none": lambda: Budget(),
    "evaluate: unknown loss": lambda: mpsearch.evaluate(_linear(), {"0": "int8", "2": "int8"}, DATA, "mse2"),
    "evaluate: plan for another model": lambda: mpsearch.evaluate(_linear(), {"fc9": "int8"}, DATA),
    "evaluate: gptq without calibration": lambda: mpsearch.evaluate(
        _linear(), {"0": "int8", "2": "int8"}, DATA, quantizer="gptq"
    ),
    "plan: empty": lambda: BitPlan({}),
    "plan: bad option": lambda: BitPlan({"fc": "int1"}),
    "plan: not JSON": lambda: BitPlan.from_json("{"),
    "table: no rows": lambda: CostTable(
        __import__("pandas").DataFrame(columns=["layer", "option", "bits", "n_params", "size_bytes", "bops", "damage"])
    ),
    "apply_plan: unknown layer": lambda: mpsearch.apply_plan(_linear(), {"fc9": "int8"}),
    "solve: evolutionary without a fitness": lambda: mpsearch.solve(
        mpsearch.estimate(_linear(), DATA, "sqnr", cache=False), Budget(avg_bits=6), "evolutionary"
    ),
    "apply_plan: gptq plan without its data": lambda: mpsearch.apply_plan(
        _linear(), BitPlan({"0": "int8"}, {"quantizer": {"name": "gptq", "params": {"damp": 0.01}, "calibration": "0"}})
    ),
    "quantizer: bad gptq parameter": lambda: mpsearch.GPTQ(_linear(), DATA, block_size=0),
    "search: strings as batches": lambda: mpsearch.search(_linear(), ["hello world", "more text"]),
    "search: numpy batches": lambda: mpsearch.search(_linear(), [__import__("numpy").zeros((4, 8))]),
    "estimate: a bad regex include": lambda: mpsearch.estimate(_linear(), DATA, "sqnr", include="re:[a"),
    "estimate: a bad regex exclude": lambda: mpsearch.estimate(_linear(), DATA, "sqnr", exclude=["re:(x"]),
    "search: the meta device": lambda: mpsearch.search("digits-cnn", device="meta"),
}


@pytest.mark.parametrize("case", list(API_CASES))
def test_api_bad_input_is_a_one_line_mpsearch_error(case):
    with pytest.raises(MpsearchError) as info:
        API_CASES[case]()
    assert "\n" not in str(info.value) and str(info.value)


@pytest.mark.parametrize(
    "url",
    [
        "sqlite://auditor:pa/ssW0RD@//tmp/x.db",
        "postgresql://auditor:pa ssW0RD@localhost/db",
        "postgresql://auditor@localhost/db?password=pa/ssW0RD&sslmode=disable",
        "postgresql+psycopg://auditor:pa/ssW0RD@localhost:5432/db",
    ],
)
def test_storage_passwords_are_redacted_in_every_form(url):
    from mpsearch.core.errors import redact

    shown = redact(f"mpsearch: error: cannot open the Optuna storage {url}")
    assert "pa/ssW0RD" not in shown and "ssW0RD" not in shown and "***" in shown
    assert "auditor" in shown  # the user name and host stay: they say which storage it was
