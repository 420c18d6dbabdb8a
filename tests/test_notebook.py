"""The notebooks run top to bottom (small settings) and are committed without outputs."""

from __future__ import annotations

import re

import nbformat
import pytest
from helpers import ROOT
from nbclient import NotebookClient

NOTEBOOKS = ROOT / "notebooks"

# notebook -> (its environment for a small run, patterns its printed output must contain)
CASES = {
    "quickstart.ipynb": ({"QUICKSTART_STEPS": "100"}, [r"checkpoint at step 100\b"]),
    "byo_model.ipynb": ({"BYO_MODEL_STEPS": "40"}, [
        r"checkpoints: \['20', '40'\]",
        r"resumed from step 40\b",
        r"test metrics of the restored checkpoint: \{'test_accuracy'",
        r"test accuracy with the L2 penalty: 0\.\d{3}",
        r"best member: [0-2] \(optim\.lr=(0\.001|0\.003|0\.01)\)",
    ]),
    "prototype_technique.ipynb": ({"PROTOTYPE_STEPS": "200"}, [
        r"scaled sign \(ours\): test accuracy 0\.\d{3}, \d+\.\dx fewer bytes sent",
        r"built-in EF-signSGD: test accuracy 0\.\d{3}",
        r"magnitude \+ saliency \(ours\): test accuracy 0\.\d{3} at sparsity 0\.90",
    ]),
    "optimize.ipynb": ({"OPTIMIZE_STEPS": "40", "OPTIMIZE_CANDIDATES": "int8"}, [
        r"best: ",
        r"candidates: \['int8'\] from one run",
        r"exported \w+ \(w8 serving form, \d+ bytes\): max \|difference\| to the framework",
    ]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_notebook_is_committed_without_outputs(name):
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(not cell.get("outputs") and cell.get("execution_count") is None for cell in code)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_notebook_executes(monkeypatch, name):
    env, patterns = CASES[name]
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("JAXOPT_LAB_ROOT", str(ROOT))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    outputs = "".join(o.get("text", "") for c in notebook.cells for o in c.get("outputs", []))
    for pattern in patterns:
        assert re.search(pattern, outputs), f"{name}: no {pattern!r} in its output"
