"""`jaxopt-lab optimize` on the digits CNN, timed from a fresh directory, in XLA or an ONNX runtime.

    .venv/bin/python experiments/optimize_digits.py [--runtime onnxruntime] [--keep]

Runs the command exactly as a user would (a subprocess, default optimize block, with
`--config.optimize.runtime=RUNTIME`), measures its wall time, and copies its report.md,
report.json and pareto.png to results/optimize_digits[_RUNTIME]/. Then checks the goals: under
15 minutes, and the best candidate within 1 point of the baseline's validation accuracy >= 8x
smaller and faster at batch 256 than the XLA float32 baseline: >= 1.5x served by XLA (its int8
weights-only form), >= 5x served by an ONNX runtime (static int8). Writes
results/optimize_digits[_RUNTIME].md; with an ONNX runtime, also its optimize_* keys in
results/deploy_summary.json (benchmarks/deploy_cpu.py writes the others).
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

GOALS = {"minutes": 15.0, "size_ratio": 8.0}
SPEEDUP_GOAL = {"xla": 1.5, "onnxruntime": 5.0, "openvino": 5.0}  # at batch 256, vs XLA float32


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime", default="xla", choices=tuple(SPEEDUP_GOAL))
    parser.add_argument("--workdir", default=None, help="default: runs/optimize_digits[_RUNTIME]")
    parser.add_argument("--keep", action="store_true", help="resume an existing workdir")
    args = parser.parse_args()
    stem = "optimize_digits" + ("" if args.runtime == "xla" else f"_{args.runtime}")
    workdir = Path(args.workdir or ROOT / "runs" / stem)
    if workdir.exists() and not args.keep:
        shutil.rmtree(workdir)
    start = time.time()
    subprocess.run([sys.executable, "-m", "jaxopt_lab.cli", "optimize", "--config",
                    str(ROOT / "configs" / "digits_cnn.py"), "--workdir", os.path.relpath(workdir, ROOT),
                    "--config.train.progress=False",
                    f"--config.optimize.runtime={args.runtime}"], check=True, cwd=ROOT,
                   env=dict(os.environ))
    minutes = (time.time() - start) / 60
    out = ROOT / "results" / stem
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
        f"best ≥ {SPEEDUP_GOAL[args.runtime]:g}× faster at batch 256 than XLA float32": (
            best is not None and best["speedup_batch256"] >= SPEEDUP_GOAL[args.runtime],
            _speedup(best) if best else "—"),
    }
    command = "jaxopt-lab optimize --config configs/digits_cnn.py" + (
        "" if args.runtime == "xla" else f" --config.optimize.runtime={args.runtime}")
    lines = [f"# `{command}`", "",
             (f"Run by `experiments/optimize_digits.py --runtime {args.runtime}` on {machine()}, "
              f"from a fresh directory, in {minutes:.1f} min of wall time. The report the command "
              f"wrote is in results/{stem}/ (report.md, report.json, pareto.png); its best "
              f"candidate: **{report['best']}**."), "",
             "| goal | met | measured |", "|---|---|---|"]
    lines += [f"| {goal} | {'yes' if ok else 'no'} | {value} |"
              for goal, (ok, value) in checks.items()]
    lines += ["", (workdir / "report.md").read_text()]
    (ROOT / "results" / f"{stem}.md").write_text("\n".join(lines))
    print("\n".join(lines[:12 + len(checks)]))
    if args.runtime != "xla":
        _summarize(report, best, minutes)


def _speedup(row: dict) -> str:
    low, high = row["speedup_batch256_range"]
    return f"{row['speedup_batch256']:.2f}× ({low:.2f}–{high:.2f})"


def _summarize(report: dict, best: dict | None, minutes: float) -> None:
    """The optimize_* keys of results/deploy_summary.json (validation drop: a fraction)."""
    path = ROOT / "results" / "deploy_summary.json"
    summary = json.loads(path.read_text()) if path.exists() else {}
    summary = {k: v for k, v in summary.items() if not k.startswith("optimize_")}
    base = report["baseline"]
    summary.update({
        "optimize_runtime": report["runtime"]["version"],
        "optimize_best": report["best"],
        "optimize_best_size_ratio": best["size_ratio"] if best else None,
        "optimize_best_speedup_batch256": best["speedup_batch256"] if best else None,
        "optimize_best_speedup_batch256_range": best["speedup_batch256_range"] if best else None,
        "optimize_best_validation_drop": (base["validation_accuracy"]
                                          - best["validation_accuracy"]) if best else None,
        "optimize_minutes": minutes,
        "optimize_source": "experiments/optimize_digits.py"})
    path.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
