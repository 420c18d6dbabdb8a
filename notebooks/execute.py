"""Run the notebooks at their full settings and write their outputs into the .ipynb files, so that
readers see the results without running them (`make notebooks`; this script alone:
`python notebooks/execute.py [NAME.ipynb ...]`, default every notebook here).

Each notebook runs top to bottom in a fresh kernel, in this folder, with the variables the tests
use to shrink it (`*_STEPS`, `OPTIMIZE_CANDIDATES`) unset, so it takes the defaults written in it;
figures are kept as inline PNGs. A cell that fails stops the script and leaves that file unchanged.
tests/test_notebook.py checks that the committed notebooks carry the outputs of such a run.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
SMALL_SETTINGS = ("QUICKSTART_STEPS", "BYO_MODEL_STEPS", "PROTOTYPE_STEPS", "OPTIMIZE_STEPS",
                  "OPTIMIZE_CANDIDATES", "DEPLOY_STEPS", "DEPLOY_ROUNDS")


def execute(path: Path) -> None:
    notebook = nbformat.read(path, as_version=4)
    # No per-cell time limit (the optimize pipeline runs for minutes); timings are not recorded,
    # and a progress bar's carriage returns collapse to its last state, as a browser shows it.
    NotebookClient(notebook, timeout=None, kernel_name="python3", record_timing=False,
                   coalesce_streams=True, resources={"metadata": {"path": str(HERE)}}).execute()
    nbformat.write(notebook, path)


def main(names: list[str]) -> None:
    for key in (*SMALL_SETTINGS, "MPLBACKEND"):  # MPLBACKEND=Agg would drop the figures
        os.environ.pop(key, None)
    os.environ["JAXOPT_LAB_ROOT"] = str(HERE.parent)
    # tqdm.auto's note that ipywidgets is missing means nothing in a saved notebook
    os.environ["PYTHONWARNINGS"] = "ignore:IProgress not found"
    for path in [HERE / name for name in names] or sorted(HERE.glob("*.ipynb")):
        start = time.perf_counter()
        execute(path)
        print(f"{path.name}: {time.perf_counter() - start:.0f} s, "
              f"{path.stat().st_size / 1e3:.0f} kB", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
