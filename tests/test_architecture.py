"""Package dependency directions (ARCHITECTURE.md), checked in fresh interpreters and statically."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _loaded_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(m.split('.')[0] for m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    return set(out.stdout.split())


@pytest.mark.parametrize(
    "statement, forbidden",
    [
        ("import mpsearch", {"torch", "ortools", "optuna", "matplotlib", "pulp", "numba", "sensitivity", "solvers"}),
        ("import mpsearch.quant.llama_cpp", {"numba", "ortools", "optuna", "matplotlib"}),  # numba: on first use
        ("import mpsearch.core", {"torch", "sensitivity", "solvers"}),
        ("import solvers", {"torch", "sensitivity", "ortools", "optuna", "matplotlib", "pulp"}),
        ("import sensitivity", {"solvers", "ortools", "optuna", "pulp"}),
    ],
)
def test_fresh_interpreter_imports(statement, forbidden):
    loaded = _loaded_after(statement)
    assert not (loaded & forbidden), f"{statement} pulled in {sorted(loaded & forbidden)}"


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module.split(".")[0], node.module}
    return names


@pytest.mark.parametrize(
    "folder, forbidden",
    [
        ("solvers", {"torch", "sensitivity"}),
        ("sensitivity", {"solvers"}),
        ("mpsearch/core", {"torch", "sensitivity", "solvers", "mpsearch.quant", "mpsearch.api"}),
    ],
)
def test_no_forbidden_imports_anywhere_in_package(folder, forbidden):
    for path in (ROOT / folder).rglob("*.py"):
        bad = _imports(path) & forbidden
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    start = readme.index("<!-- test-command -->")
    command = readme[start:].split("```bash\n", 1)[1].split("\n```", 1)[0].strip()
    assert command in ci, "the README's test command must appear verbatim in .ci/run"
    assert "constraints.txt" in command
    assert "torch==2.13.0" in (ROOT / "constraints.txt").read_text()
