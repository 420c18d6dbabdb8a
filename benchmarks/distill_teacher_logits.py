"""Teacher logits computed once before training vs in every step, for MNIST-1D students of the
wide (128-channel) CNN with a 40k-sample transfer set.

    .venv/bin/python benchmarks/distill_teacher_logits.py [--steps 1000] [--rounds 2]

With no augmentation a training example's teacher logits never change, so `teacher_logits=auto`
computes them once (one forward pass over the 44k training arrays) and the step reads them with
the batch; with augmentation (or feature hints) the teacher runs inside the step. Both sides are
whole `train_and_evaluate` runs (precompute, compile, train, evaluate), alternating over rounds;
best of each. The teacher is the wide CNN after a few steps: its accuracy does not change the cost.

Writes the "Distillation: teacher logits precomputed vs in the step" section of
benchmarks/RESULTS.md and benchmarks/distill_teacher_logits.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from results_file import write_section

from jaxopt_lab import load_config, train_and_evaluate

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
from common import ROOT, machine

QUIET = ["--config.train.progress=False", "--config.train.measure=False"]
STUDENTS = {"mlp": ("mnist1d_mlp.py", []), "cnn25": ("mnist1d_cnn.py", [])}


def student_config(name: str, teacher: str, mode: str, steps: int):
    config_file, overrides = STUDENTS[name]
    D = "--config.techniques.distill"
    return load_config(str(ROOT / "configs" / config_file), [
        *overrides, *QUIET, f"--config.train.steps={steps}", f"--config.train.log_every={steps // 5}",
        f"--config.train.eval_every={steps}", f"--config.train.checkpoint_every={steps}",
        f"{D}.teacher={teacher}", f"{D}.transfer_size=40000", f"{D}.teacher_logits={mode}"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="distill_logits_"))
    teacher = str(root / "teacher")
    train_and_evaluate(load_config(str(ROOT / "configs" / "mnist1d_cnn.py"), [
        "--config.model.channels=128", "--config.train.steps=20", *QUIET]), teacher)
    rows = {}
    for name in STUDENTS:
        seconds = {"precomputed": [], "in_step": []}
        rate = {"precomputed": [], "in_step": []}
        for r in range(args.rounds):
            for mode in ("precomputed", "in_step"):
                start = time.perf_counter()
                summary = train_and_evaluate(student_config(name, teacher, mode, args.steps),
                                             str(root / f"{name}_{mode}_{r}"))
                seconds[mode].append(time.perf_counter() - start)
                rate[mode].append(summary["steps_per_s"])
                print(f"{name} {mode} round {r}: {seconds[mode][-1]:.1f} s, "
                      f"{rate[mode][-1]:.0f} steps/s", flush=True)
        rows[name] = {"seconds": seconds, "steps_per_s": rate,
                      "whole_run_in_step_over_precomputed":
                          min(seconds["in_step"]) / min(seconds["precomputed"]),
                      "steps_per_s_precomputed_over_in_step":
                          max(rate["precomputed"]) / max(rate["in_step"])}
    shutil.rmtree(root, ignore_errors=True)
    result = {"machine": machine(), "steps": args.steps, "rounds": args.rounds, "students": rows}
    out = ROOT / "benchmarks"
    (out / "distill_teacher_logits.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "## Distillation: teacher logits precomputed vs in the step", "",
        (f"Written by `benchmarks/distill_teacher_logits.py` on {machine()}: MNIST-1D students "
         f"of the 128-channel CNN, 4000 training + 40000 transfer examples, batch 100, "
         f"{args.steps} steps; whole runs (precompute, compile, train, evaluate), best of "
         f"{args.rounds} alternating rounds. `teacher_logits=auto` precomputes when nothing "
         "changes the logits (no augmentation, no feature hints, a classification task)."), "",
        ("| student | whole run, precomputed (s) | whole run, in step (s) | in step / "
         "precomputed | training steps/s, precomputed | in step | speed-up of the step |"),
        "|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        lines.append(
            f"| {name} | {min(row['seconds']['precomputed']):.1f} | "
            f"{min(row['seconds']['in_step']):.1f} | "
            f"{row['whole_run_in_step_over_precomputed']:.2f}× | "
            f"{max(row['steps_per_s']['precomputed']):.0f} | "
            f"{max(row['steps_per_s']['in_step']):.0f} | "
            f"{row['steps_per_s_precomputed_over_in_step']:.2f}× |")
    write_section(out / "RESULTS.md", "distill-teacher-logits", lines)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
