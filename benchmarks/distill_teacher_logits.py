"""Teacher logits computed once before training vs in every step, for MNIST-1D students of the
wide (128-channel) CNN with a 40k-sample transfer set.

    .venv/bin/python benchmarks/distill_teacher_logits.py [--steps 1000] [--rounds 2]
    .venv/bin/python benchmarks/distill_teacher_logits.py --render  # the section from the JSON

With no augmentation a training example's teacher logits never change, so `teacher_logits=auto`
computes them once (one forward pass over the 44k training arrays) and the step reads them with
the batch; with augmentation (or feature hints) the teacher runs inside the step. Both sides are
whole `train_and_evaluate` runs (precompute, compile, train, evaluate), alternating over rounds;
each round's ratios are reported beside the best of each side's rounds. The teacher is the wide
CNN after a few steps: its accuracy does not change the cost.

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


def measure(steps: int, rounds: int) -> dict:
    """Times both modes for each student over alternating rounds, against one shared teacher."""
    root = Path(tempfile.mkdtemp(prefix="distill_logits_"))
    teacher = str(root / "teacher")
    train_and_evaluate(load_config(str(ROOT / "configs" / "mnist1d_cnn.py"), [
        "--config.model.channels=128", "--config.train.steps=20", *QUIET]), teacher)
    rows = {}
    for name in STUDENTS:
        seconds = {"precomputed": [], "in_step": []}
        rate = {"precomputed": [], "in_step": []}
        for r in range(rounds):
            for mode in ("precomputed", "in_step"):
                start = time.perf_counter()
                summary = train_and_evaluate(student_config(name, teacher, mode, steps),
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
    return {"machine": machine(), "steps": steps, "rounds": rounds, "students": rows}


def with_rounds(result: dict) -> dict:
    """Adds each round's ratios beside the best-of-rounds ones: on this shared machine a round's
    busy spell moves them, and the best of each side alone hides by how much."""
    students = {}
    for name, row in result["students"].items():
        seconds, rate = row["seconds"], row["steps_per_s"]
        students[name] = {
            **row,
            "whole_run_in_step_over_precomputed_per_round": [
                i / p for i, p in zip(seconds["in_step"], seconds["precomputed"], strict=True)],
            "steps_per_s_precomputed_over_in_step_per_round": [
                p / i for p, i in zip(rate["precomputed"], rate["in_step"], strict=True)]}
    return {**result, "students": students}


def _rounds(values: list[float], digits: int, unit: str = "") -> str:
    return ", ".join(f"{v:.{digits}f}{unit}" for v in values)


def section(result: dict) -> list[str]:
    steps, rounds = result["steps"], result["rounds"]
    share = [steps / rate / seconds for row in result["students"].values()
             for mode in ("precomputed", "in_step")
             for rate, seconds in zip(row["steps_per_s"][mode], row["seconds"][mode])]
    lines = [
        "## Distillation: teacher logits precomputed vs in the step", "",
        (f"Written by `benchmarks/distill_teacher_logits.py --steps {steps} --rounds {rounds}` "
         f"on {result['machine']}: MNIST-1D students of the 128-channel CNN, 4000 training + "
         f"40000 transfer examples, batch 100, {steps} steps, {rounds} alternating rounds. "
         "`teacher_logits=auto` precomputes when nothing changes the logits (no augmentation, "
         "no feature hints, a classification task)."),
        ("Two different measures. The step speed-up is per training step: the training loop's "
         "steps/s (the run's `steps_per_s`, steps over the loop's seconds). The whole-run ratio "
         "is over the seconds a user waits for (precompute, compile, train, evaluate) and gains "
         f"much less: the training loop is {100 * min(share):.0f}–{100 * max(share):.0f} % of "
         "a whole run here. Each cell lists the rounds in order; in brackets, the ratio of "
         "each side's best round, whichever round that was."), "",
        ("| student | one training step: precomputed / in step (speed-up), per round | "
         "training steps/s, precomputed | training steps/s, in step | whole run: in step / "
         "precomputed, per round | whole run, precomputed (s) | whole run, in step (s) |"),
        "|---|---|---|---|---|---|---|"]
    for name, row in result["students"].items():
        seconds, rate = row["seconds"], row["steps_per_s"]
        lines.append(
            f"| {name} | {_rounds(row['steps_per_s_precomputed_over_in_step_per_round'], 2, '×')}"
            f" ({row['steps_per_s_precomputed_over_in_step']:.2f}×) | "
            f"{_rounds(rate['precomputed'], 0)} | {_rounds(rate['in_step'], 0)} | "
            f"{_rounds(row['whole_run_in_step_over_precomputed_per_round'], 2, '×')} "
            f"({row['whole_run_in_step_over_precomputed']:.2f}×) | "
            f"{_rounds(seconds['precomputed'], 1)} | {_rounds(seconds['in_step'], 1)} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--render", action="store_true",
                        help="measure nothing: rewrite the section from the JSON as it stands")
    args = parser.parse_args()
    out = ROOT / "benchmarks"
    path = out / "distill_teacher_logits.json"
    result = with_rounds(json.loads(path.read_text()) if args.render else
                         measure(args.steps, args.rounds))
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(write_section(out / "RESULTS.md", "distill-teacher-logits", section(result)))


if __name__ == "__main__":
    main()
