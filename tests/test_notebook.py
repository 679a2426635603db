"""The Pareto explorer notebook runs headless and shows what it promises."""

import json
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "pareto_explorer.ipynb"


def test_notebook_runs_and_its_plan_is_within_budget(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), "no figure was drawn"
    printed = [o["text"] for o in outputs if o.output_type == "stream" and o.get("name") == "stdout"]
    facts = json.loads(printed[-1].strip().splitlines()[-1])
    assert facts["within_budget"] and facts["size_bytes"] <= facts["budget_bytes"]
    assert facts["size_bytes"] < facts["uniform_int4_size"]
