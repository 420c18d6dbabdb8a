"""The notebooks are committed with the outputs of a full run (`make notebooks`), and run top to
bottom at small settings in the suite (slow), printing what they should."""

from __future__ import annotations

import re

import nbformat
import pytest
from helpers import ROOT
from nbclient import NotebookClient

NOTEBOOKS = ROOT / "notebooks"

# notebook -> (its environment for a small run, patterns its printed output must contain)
CASES = {
    "quickstart.ipynb": ({"QUICKSTART_STEPS": "100"}, [
        r"final validation accuracy 0\.\d{3}",
        r"checkpoint at step 100\b",
    ]),
    "byo_model.ipynb": ({"BYO_MODEL_STEPS": "40"}, [
        r"checkpoints: \['20', '40'\]",
        r"resumed from step 40\b",
        r"test metrics of the restored checkpoint: \{'test_accuracy'",
        r"test accuracy with the L2 penalty: 0\.\d{3}",
        r"best member: [0-2] \(optim\.lr=(0\.001|0\.003|0\.01)\)",
    ]),
    "prototype_technique.ipynb": ({"PROTOTYPE_STEPS": "200"}, [
        r"each run trains 200 steps",
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

DEPLOYED = [r"static int8 form: test accuracy 0\.\d{4}",
            r"checked in openvino \S+: argmax agreement",
            r"onnxruntime client: test accuracy 0\.\d{4}, agreement (9\d|100)\.\d\d%",
            r"openvino client: test accuracy 0\.\d{4}, agreement (9\d|100)\.\d\d%",
            r"fastest at batch 256: \w+ int8 \w+, \d+\.\d\d× XLA float32"]
CASES["deploy.ipynb"] = ({"DEPLOY_STEPS": "60", "DEPLOY_ROUNDS": "2"},
                         [r"trained 60 steps: test accuracy 0\.\d{4}", *DEPLOYED])

# notebook -> patterns the outputs committed from a full run (the notebook's defaults) contain
FULL = {
    "quickstart.ipynb": [r"final validation accuracy 0\.\d{3}", r"checkpoint at step 6000\b"],
    "byo_model.ipynb": [r"checkpoints: \['1000', '500'\]", r"resumed from step 1000\b",
                        *CASES["byo_model.ipynb"][1][2:]],
    "prototype_technique.ipynb": [r"each run trains 3000 steps",
                                  *CASES["prototype_technique.ipynb"][1][1:]],
    "optimize.ipynb": [r"best: ", r"candidates: \['\w+'(, '\w+')+\] from one run",
                       *CASES["optimize.ipynb"][1][2:]],
    "deploy.ipynb": [r"trained 6000 steps: test accuracy 0\.\d{4}", *DEPLOYED],
}


def _printed(notebook) -> str:
    return "".join(o.get("text", "") for c in notebook.cells for o in c.get("outputs", []))


@pytest.mark.parametrize("name", sorted(CASES))
def test_notebook_is_committed_with_the_outputs_of_a_full_run(name):
    """`make notebooks` ran it: every code cell once, in order, none failing, a figure shown."""
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    counts = [cell.get("execution_count") for cell in code]
    assert counts == list(range(1, len(code) + 1)), f"{name}: run `make notebooks` ({counts})"
    outputs = [o for cell in code for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o["output_type"] == "error"], f"{name}: a cell failed"
    assert any("image/png" in o.get("data", {}) for o in outputs), f"{name}: no figure"
    for pattern in FULL[name]:
        assert re.search(pattern, _printed(notebook)), f"{name}: no {pattern!r} in its outputs"


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
    for pattern in patterns:
        assert re.search(pattern, _printed(notebook)), f"{name}: no {pattern!r} in its output"
