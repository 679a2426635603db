"""Reliability regressions (issue 14): no secret written, no poisoned cache, no silent wrong result, one-line
errors for bad input."""

import json

import pytest
import torch

import mpsearch
from mpsearch.cli import main
from mpsearch.core import Budget, MpsearchError
from solvers import Evolutionary, Problem

SECRET = "s3cretPW"


def _cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _files_contain(root, text: str) -> list:
    return [p for p in root.rglob("*") if p.is_file() and text.encode() in p.read_bytes()]


def test_a_storage_password_is_never_written_nor_shown(digits, tmp_path, monkeypatch, capsys):
    import solvers.evolutionary as evo

    url = f"postgresql+psycopg://mpuser:{SECRET}@127.0.0.1:1/studies"
    # unreachable server: the one-line error names the storage without its password
    monkeypatch.chdir(tmp_path)
    code, out, err = _cli(
        capsys,
        "search",
        "--model",
        "digits-cnn",
        "--solver",
        "evolutionary",
        "--trials",
        "2",
        "--solver-params",
        json.dumps({"storage": url}),
        "--out",
        str(tmp_path / "plan.json"),
    )
    last = err.strip().splitlines()[-1]  # above it: status lines and progress bars
    assert code == 2 and SECRET not in out + err and "Traceback" not in err
    assert last.startswith("mpsearch: error: cannot open the Optuna storage") and "mpuser:***@127.0.0.1:1" in last
    # a reachable one (an in-memory study stands in for it): the plan and every export hold no password
    real = evo._open_study
    monkeypatch.setattr(evo, "_open_study", lambda name, storage, sampler: real(name, None, sampler))
    table = mpsearch.estimate(digits.model, digits.calibration, "sqnr", ["int4", "int8"], loss_fn="kl")
    from mpsearch.fitness import PlanFitness

    fitness = PlanFitness(digits.model, digits.calibration, "kl")
    result = Evolutionary(fitness, n_trials=2, storage=url, run_dir=str(tmp_path / "run"), resume=True).solve(
        Problem(table, Budget(avg_bits=6.0))
    )
    result.plan.save(tmp_path / "plan.json")
    (tmp_path / "plan.txt").write_text(repr(result.plan.provenance) + json.dumps(result.extra, default=str))
    assert result.plan.provenance["solver_params"]["storage"] == "postgresql+psycopg://mpuser:***@127.0.0.1:1/studies"
    for target in ("json", "mpsearch"):
        assert (
            _cli(
                capsys,
                "export",
                str(tmp_path / "plan.json"),
                "--target",
                target,
                "--out",
                str(tmp_path / f"x.{target}"),
            )[0]
            == 0
        )
    assert _files_contain(tmp_path, SECRET) == []


def test_a_cache_path_that_is_a_file_fails_at_once(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "cache"
    blocker.write_text("not a directory")
    monkeypatch.setenv("MPSEARCH_CACHE", str(blocker))
    code, _, err = _cli(capsys, "search", "--model", "digits-cnn")
    assert code == 2 and f"the cache path {blocker} is a file, not a directory" in err
    assert blocker.read_text() == "not a directory"


def test_an_unreadable_cached_table_is_recomputed_not_fatal(digits, caplog):
    from sensitivity.base import table_cache_path

    first = mpsearch.estimate(digits.model, digits.calibration, "sqnr", ["int3", "int8"], loss_fn="kl")
    path = table_cache_path(first.meta)
    assert path.exists()
    path.write_bytes(path.read_bytes()[:40])  # truncated
    again = mpsearch.estimate(digits.model, digits.calibration, "sqnr", ["int3", "int8"], loss_fn="kl")
    assert again.frame.equals(first.frame)
    assert "is unreadable" in caplog.text and "recomputing it" in caplog.text
    assert mpsearch.CostTable.from_parquet(path).frame.equals(first.frame)  # rewritten whole


def test_non_finite_weights_are_an_error_naming_the_layer_everywhere():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    model[2].weight.data[0, 0] = float("nan")
    data = [torch.randn(4, 8)]
    for name in ("sqnr", "fisher", "entropy"):
        with pytest.raises(MpsearchError, match="layer '2' has non-finite weights"):
            mpsearch.estimate(model, data, name, ["int4", "int8"], cache=False)
    with pytest.raises(MpsearchError, match="layer '2' has non-finite weights"):
        mpsearch.evaluate(model, mpsearch.uniform_plan(model, "int8"), data)
    model[2].weight.data[0, 0] = 0.0
    model[0].bias.data[0] = float("inf")  # finite weights, infinite outputs: the metric is not a number
    with pytest.raises(MpsearchError, match="the planned model's .* is nan on this data"):
        mpsearch.evaluate(model, mpsearch.uniform_plan(model, "int8"), data)


def test_all_zero_weights_are_quantized_exactly_not_a_crash():
    model = torch.nn.Sequential(torch.nn.Linear(8, 4))
    torch.nn.init.zeros_(model[0].weight)
    table = mpsearch.estimate(model, [torch.randn(4, 8)], "entropy", ["int2", "int8"], cache=False)
    assert (table.frame["damage"] == 0).all()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["pareto", "--model", "digits-cnn", "--measure", "-1", "--out", "f.csv"], "--measure -1 is negative"),
        (["pareto", "--model", "digits-cnn", "--plot", "front.xyz"], "cannot write a 'xyz' image; end the name"),
        (["search", "--model", "digits-cnn", "--solver", "evolutionary", "--trials", "-3"], "n_trials"),
        (["search", "--model", "digits-cnn", "--refine", "-1"], "refine=-1 is not a count"),
        (["export", "nope.json", "--target", "llama.cpp", "--arch", "x", "--out", "o"], "nope.json"),
    ],
)
def test_bad_arguments_are_one_line_errors(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = _cli(capsys, *argv)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_torchao_missing_is_a_one_line_error_naming_the_install(monkeypatch, tmp_path, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    plan = mpsearch.BitPlan({"fc": "torchao:int4_g32"})
    plan.save(tmp_path / "p.json")
    code, _, err = _cli(capsys, "export", str(tmp_path / "p.json"), "--target", "torchao")
    assert code == 2 and "need the torchao package; install mpsearch with its torchao extra: pip install" in err


def test_hqq_missing_is_a_one_line_error_naming_the_extra(monkeypatch, capsys):
    import importlib.util

    import torch

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "hqq" else real(name, *a))
    with pytest.raises(mpsearch.MpsearchError, match=r"needs the hqq package; install mpsearch with its hqq extra"):
        mpsearch.quantize_weight(torch.randn(8, 64), "hqq:int4_g64")


class _TrainModeNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 8, 3)
        self.bn = torch.nn.BatchNorm2d(8)
        self.drop = torch.nn.Dropout(0.5)
        self.fc = torch.nn.Linear(8 * 6 * 6, 10)

    def forward(self, x):
        return self.fc(self.drop(torch.relu(self.bn(self.conv(x)))).flatten(1))


def _state(model) -> tuple:
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [m.training for m in model.modules()],
        [p.requires_grad for p in model.parameters()],
    )


def test_every_public_entry_point_leaves_a_train_mode_model_untouched():
    from mpsearch.fitness import PlanFitness

    torch.manual_seed(0)
    model = _TrainModeNet().train()
    data = [torch.randn(4, 1, 8, 8) for _ in range(3)]
    before = _state(model)
    table = mpsearch.estimate(model, data, "sqnr", ["int4", "int8"], loss_fn="kl", cache=False)
    bops = table.uniform_cost("int8", "bops")
    calls = {
        "search(bops)": lambda: mpsearch.search(model, data, Budget(bops=bops), "sqnr", options=["int4", "int8"]),
        "search(gptq)": lambda: mpsearch.search(
            model, data, Budget(avg_bits=6), "fisher", options=["int4", "int8"], quantizer="gptq"
        ),
        "estimate": lambda: mpsearch.estimate(
            model, data, "hessian", ["int4"], cache=False, estimator_params={"max_probes": 2, "min_probes": 2}
        ),
        "evaluate": lambda: mpsearch.evaluate(model, mpsearch.uniform_plan(model, "int4"), data),
        "apply_plan": lambda: mpsearch.apply_plan(model, mpsearch.uniform_plan(model, "int4")),
        "pareto": lambda: mpsearch.pareto(model, data, "sqnr", ["int4", "int8"], loss_fn="kl"),
        "fitness": lambda: PlanFitness(model, data, "kl")(mpsearch.uniform_plan(model, "int4")),
    }
    for name, call in calls.items():
        call()
        after = _state(model)
        assert all(torch.equal(before[0][k], after[0][k]) for k in before[0]), name
        assert before[1:] == after[1:], name


@pytest.mark.parametrize("backend", ["cbc", "highs", "cpsat"])
@pytest.mark.parametrize("incumbent_optimal", [True, False])
def test_an_ilp_time_limit_bounds_the_whole_solve_and_always_returns_a_plan(backend, incumbent_optimal, monkeypatch):
    import sys
    import time

    import solvers.core
    from solvers import ILP, Greedy

    sys.path.insert(0, "experiments")
    from bench_solvers import budget_for, make_table

    table = make_table(2000)
    problem = Problem(table, budget_for(table, False))
    if not incumbent_optimal:  # as when CoreDP's state cap bites: a feasible incumbent with a gap
        greedy = Greedy().solve(problem)
        greedy.status, greedy.gap = "feasible", 0.5
        monkeypatch.setattr(solvers.core.CoreDP, "solve", lambda self, p: greedy)
    start = time.perf_counter()
    result = ILP(backend=backend, time_limit=0.5).solve(problem)
    wall = time.perf_counter() - start
    assert wall < 1.5 and problem.is_feasible(problem.choice_of(result.plan))
    if incumbent_optimal:  # CoreDP proved it: returned at once
        assert result.status == "optimal" and result.gap == 0.0 and wall < 0.5
    else:
        assert result.status in ("feasible", "time_limit", "optimal") and result.objective <= greedy.objective + 1e-12
    _assert_no_child_left()


def _assert_no_child_left(wait_s: float = 3.0) -> None:
    """An abandoned backend leaves no process behind (HiGHS runs in a spawned child, killed at the deadline)."""
    import multiprocessing
    import time

    deadline = time.monotonic() + wait_s
    while multiprocessing.active_children() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert multiprocessing.active_children() == []


def test_corrupt_cached_zoo_weights_are_rebuilt_and_said(caplog, tmp_path, monkeypatch):
    from mpsearch.models.digits import VERSION, load_digits_cnn

    monkeypatch.setenv("MPSEARCH_CACHE", str(tmp_path))
    first = load_digits_cnn()  # trains once, caches
    path = tmp_path / f"digits-cnn-v{VERSION}.pt"
    path.write_bytes(path.read_bytes()[:100])  # truncated (garbage fails the same weights_only load)
    again = load_digits_cnn()
    assert "are unreadable" in caplog.text and "training digits-cnn again" in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))
    assert torch.load(path, weights_only=True).keys() == first.state_dict().keys()  # rewritten whole


@pytest.mark.parametrize("where", ["missing_dir", "is_dir", "file_as_folder", "dev_full"])
def test_file_system_faults_on_outputs_are_one_line_errors(where, tmp_path, capsys):
    plan = mpsearch.BitPlan({"features.0": "int8"})
    plan.save(tmp_path / "p.json")
    if where == "missing_dir":
        out = tmp_path / "no" / "such" / "dir" / "x.txt"
    elif where == "is_dir":
        out = tmp_path / "a_folder"
        out.mkdir()
    elif where == "file_as_folder":
        (tmp_path / "a_file").write_text("keep me")
        out = tmp_path / "a_file" / "x.txt"
    else:
        out = "/dev/full"
    code, _, err = _cli(capsys, "export", str(tmp_path / "p.json"), "--target", "json", "--out", str(out))
    assert code == 2 and f"cannot write {out}: " in err and len(err.strip().splitlines()) == 1
    assert mpsearch.BitPlan.load(tmp_path / "p.json") == plan  # the user's file is intact


def test_an_unwritable_cache_is_said_once_and_the_search_goes_on(digits, caplog, monkeypatch):
    import errno

    def read_only(self, path):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(mpsearch.CostTable, "to_parquet", read_only)
    for options in (["int3", "int6"], ["int2", "int6"]):
        table = mpsearch.estimate(digits.model, digits.calibration, "sqnr", options, loss_fn="kl")
        assert set(table.options) == set(options)
    assert caplog.text.count("going on without caching") == 1 and "Read-only file system" in caplog.text


def test_a_cache_torch_save_cannot_write_is_said_once_and_the_work_goes_on(caplog, monkeypatch, tmp_path):
    # torch.save reports a read-only or full file system as RuntimeError, not OSError: the GPTQ state and the
    # digits weights are written with it, and neither may end the search
    import mpsearch.data
    from mpsearch.quant.gptq_cache import cached_gptq

    def read_only(obj, path, *args, **kwargs):
        raise RuntimeError(f"File {path} cannot be opened: Read-only file system")

    monkeypatch.setenv("MPSEARCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(torch, "save", read_only)
    monkeypatch.setattr(mpsearch.data, "_UNWRITABLE", set())
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    data = [torch.randn(16, 8)]
    first, second = cached_gptq(model, data, {}), cached_gptq(model, data, {})
    assert first.factors.keys() == second.factors.keys() == {"0", "2"}  # built twice: nothing was cached
    assert caplog.text.count("going on without caching") == 1 and "Read-only file system" in caplog.text
    assert not list((tmp_path / "cache").rglob("*.pt")) and not list((tmp_path / "cache").rglob("*.tmp"))


def test_ctrl_c_while_an_estimator_runs_leaves_the_model_and_the_cache_whole(digits, monkeypatch, tmp_path, capsys):
    """SIGINT arrives while the measured estimator has quantized weights swapped in (the hold hook waits
    there): exit 130 with one line, the model byte-identical, no cache file half-written."""
    import os
    import signal
    import threading
    import time

    import torch

    model = digits.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = {n: (p, p.requires_grad) for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}
    held, cache = tmp_path / "held", tmp_path / "cache"
    monkeypatch.setenv("MPSEARCH_TEST_HOLD", str(held))
    monkeypatch.setenv("MPSEARCH_CACHE", str(cache))
    monkeypatch.setattr("mpsearch.models.load", lambda name, device=None: digits)

    def interrupt():
        deadline = time.monotonic() + 120
        while not held.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        if held.exists():  # never a stray signal into the test run
            os.kill(os.getpid(), signal.SIGINT)

    # Python's own Ctrl-C handler (KeyboardInterrupt), whatever an earlier test or library installed
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    thread = threading.Thread(target=interrupt, daemon=True)
    try:
        thread.start()
        code = main(["search", "--model", "digits-cnn", "--estimator", "measured", "--no-safe"])
        thread.join()
    finally:
        signal.signal(signal.SIGINT, previous)
    err = capsys.readouterr().err
    assert held.exists() and code == 130
    assert err.count("mpsearch: interrupted") == 1 and "Traceback" not in err and "mpsearch: error" not in err
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    assert all(p is dict(model.named_parameters())[n] and p.requires_grad == g for n, (p, g) in params.items())
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert not [f for f in cache.rglob("*") if f.is_file()] if cache.exists() else True  # nothing half-written
