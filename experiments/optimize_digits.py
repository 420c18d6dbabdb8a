"""`jaxopt-lab optimize` on the digits CNN, timed from a fresh directory: issue 11's headline.

    .venv/bin/python experiments/optimize_digits.py [--workdir runs/optimize_digits] [--keep]

Runs the command exactly as a user would (a subprocess, default optimize block), measures its
wall time, and copies its report.md, report.json and pareto.png to results/optimize_digits/. Then
checks the goals: under 15 minutes, and the best candidate within 1 point of the baseline's
validation accuracy both >= 8x smaller and >= 1.5x faster at batch 256 (on its serving form).
Writes results/optimize_digits.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, machine

GOALS = {"minutes": 15.0, "size_ratio": 8.0, "speedup_batch256": 1.5}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=str(ROOT / "runs" / "optimize_digits"))
    parser.add_argument("--keep", action="store_true", help="resume an existing workdir")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    if workdir.exists() and not args.keep:
        shutil.rmtree(workdir)
    start = time.time()
    subprocess.run([sys.executable, "-m", "jaxopt_lab.cli", "optimize", "--config",
                    str(ROOT / "configs" / "digits_cnn.py"), "--workdir", os.path.relpath(workdir, ROOT),
                    "--config.train.progress=False"], check=True, cwd=ROOT,
                   env=dict(os.environ))
    minutes = (time.time() - start) / 60
    out = ROOT / "results" / "optimize_digits"
    out.mkdir(parents=True, exist_ok=True)
    for name in ("report.md", "report.json", "pareto.png"):
        shutil.copy(workdir / name, out / name)
    report = json.loads((workdir / "report.json").read_text())
    best = next((c for c in report["candidates"] if c["name"] == report["best"]), None)
    checks = {
        f"finished in under {GOALS['minutes']:.0f} min": (minutes < GOALS["minutes"],
                                                          f"{minutes:.1f} min"),
        f"best ≥ {GOALS['size_ratio']:.0f}× smaller": (
            best is not None and best["size_ratio"] >= GOALS["size_ratio"],
            f"{best['size_ratio']:.1f}×" if best else "no candidate within the constraint"),
        f"best ≥ {GOALS['speedup_batch256']}× faster at batch 256": (
            best is not None and best["speedup_batch256"] >= GOALS["speedup_batch256"],
            f"{best['speedup_batch256']:.2f}×" if best else "—"),
    }
    lines = ["# `jaxopt-lab optimize --config configs/digits_cnn.py`", "",
             (f"Run by `experiments/optimize_digits.py` on {machine()}, from a fresh directory, "
              f"in {minutes:.1f} min of wall time. The report the command wrote is in "
              "results/optimize_digits/ (report.md, report.json, pareto.png); its best "
              f"candidate: **{report['best']}**."), "",
             "| goal | met | measured |", "|---|---|---|"]
    lines += [f"| {goal} | {'yes' if ok else 'no'} | {value} |"
              for goal, (ok, value) in checks.items()]
    lines += ["", (workdir / "report.md").read_text()]
    (ROOT / "results" / "optimize_digits.md").write_text("\n".join(lines))
    print("\n".join(lines[:12 + len(checks)]))


if __name__ == "__main__":
    main()
