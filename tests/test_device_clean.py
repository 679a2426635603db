"""Device cleanliness, checked statically so that a CPU-only CI catches what would break on a GPU: in the
estimators (sensitivity/), the quantizers (mpsearch/quant/) and the runtimes (mpsearch/runtimes/), every tensor
factory and random generator names its device (the model's, a tensor's, or an explicit "cpu" for host-side
bookkeeping)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECKED = ("sensitivity", "mpsearch/quant", "mpsearch/runtimes")
FACTORIES = {
    "zeros", "ones", "empty", "full", "rand", "randn", "randint", "randperm", "arange", "linspace",
    "logspace", "eye", "tensor", "as_tensor", "Generator",
}  # fmt: skip


def deviceless_factories(source: str) -> list[tuple[int, str]]:
    """(line, call) of every ``torch.<factory>(...)`` without a ``device=`` (a Generator may name it first)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        func = node.func
        if not (isinstance(func.value, ast.Name) and func.value.id == "torch" and func.attr in FACTORIES):
            continue
        if any(k.arg == "device" for k in node.keywords) or (func.attr == "Generator" and node.args):
            continue
        found.append((node.lineno, ast.unparse(node)))
    return found


def test_the_check_catches_factories_without_a_device():
    bad = "import torch\nx = torch.zeros(3)\ng = torch.Generator()\ny = torch.randn(2, generator=g)\n"
    good = "import torch\nx = torch.zeros(3, device=d)\ng = torch.Generator(device=d)\nz = torch.zeros_like(x)\n"
    assert [line for line, _ in deviceless_factories(bad)] == [2, 3, 4]
    assert deviceless_factories(good) == []


FILES = sorted(str(p.relative_to(ROOT)) for folder in CHECKED for p in (ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize("path", FILES)
def test_every_tensor_factory_names_its_device(path):
    found = deviceless_factories((ROOT / path).read_text())
    assert not found, f"{path}: tensor factories without device=: {found}"
