"""Distillation on MNIST-1D: an MLP and a CNN 20x smaller than its teacher, each trained alone and
distilled (soft targets, a 40k-sample transfer set, feature hints), 5 seeds paired.

    .venv/bin/python experiments/distill_mnist1d.py [--seeds 5] [--fresh]

Teachers (the paper's recipe, `configs/mnist1d_cnn.py`: Adam 1e-2, batch 100, 6000 steps): the
25-channel CNN and the wide one (128 channels), each a population over the seeds; member 0 (seed
0) teaches. Students train for STUDENT_STEPS with the same optimizer, every variant one population
over the seeds, so a student's seed-s run alone and distilled share initialisation: differences
are paired. KD: T 4, alpha 0.9 (Hinton et al. 2015). The transfer set is 40k fresh MNIST-1D
samples (generator seed 1; the splits come from seed 42), labelled by the teacher only; its
logits are precomputed once (no augmentation, so they never change).

Writes results/distill_mnist1d.{md,json,png}. Finished runs are reused (--fresh retrains).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
from common import ROOT, machine, stats

from jaxopt_lab import load_config, train_and_evaluate

TEACHER_STEPS = 6000
STUDENT_STEPS = 12000
TRANSFER = 40000
D = "--config.techniques.distill"


def runs(root: Path) -> dict[str, tuple[str, list[str], int]]:
    """name: (config file, overrides, steps)."""
    cnn25, cnn128 = root / "teacher_cnn25", root / "teacher_cnn128"
    kd = [f"{D}.temperature=4.0", f"{D}.alpha=0.9", f"{D}.teacher_member=0"]
    transfer = [f"{D}.transfer_size={TRANSFER}"]
    return {
        "teacher_cnn25": ("mnist1d_cnn.py", [], TEACHER_STEPS),
        "teacher_cnn128": ("mnist1d_cnn.py", ["--config.model.channels=128"], TEACHER_STEPS),
        "mlp_alone": ("mnist1d_mlp.py", [], STUDENT_STEPS),
        "mlp_kd": ("mnist1d_mlp.py", [f"{D}.teacher={cnn25}", *kd], STUDENT_STEPS),
        "mlp_kd_transfer": ("mnist1d_mlp.py", [f"{D}.teacher={cnn25}", *kd, *transfer],
                            STUDENT_STEPS),
        "small_cnn_alone": ("mnist1d_cnn.py", [], STUDENT_STEPS),
        "small_cnn_kd": ("mnist1d_cnn.py", [f"{D}.teacher={cnn128}", *kd], STUDENT_STEPS),
        "small_cnn_kd_transfer": ("mnist1d_cnn.py", [f"{D}.teacher={cnn128}", *kd, *transfer],
                                  STUDENT_STEPS),
        # FitNets: the last conv's activations (length 5; 25 -> 128 channels through a map).
        "small_cnn_hints_transfer": ("mnist1d_cnn.py", [
            f"{D}.teacher={cnn128}", *kd, *transfer, f"{D}.features=(('Conv_2','Conv_2'),)",
            f"{D}.feature_weight=0.1"], STUDENT_STEPS),
        # A 10-channel CNN (1/5 of the 25-channel one) from the 25-channel teacher.
        "tiny_cnn_alone": ("mnist1d_cnn.py", ["--config.model.channels=10"], STUDENT_STEPS),
        "tiny_cnn_kd_transfer": ("mnist1d_cnn.py", ["--config.model.channels=10",
                                                    f"{D}.teacher={cnn25}", *kd, *transfer],
                                 STUDENT_STEPS),
    }


def train(name: str, spec: tuple[str, list[str], int], seeds: int, workdir: Path,
          fresh: bool) -> dict:
    """One population over the seeds; its members' test accuracies and its size."""
    config_file, overrides, steps = spec
    if fresh and workdir.exists():
        shutil.rmtree(workdir)
    config = load_config(str(ROOT / "configs" / config_file), [
        *overrides, f"--config.train.steps={steps}",
        f"--config.population=(('seed', {tuple(range(seeds))!r}),)",
        "--config.train.progress=False", "--config.train.measure=False"])
    summary = train_and_evaluate(config, str(workdir))
    accuracy = [m["test_accuracy"] for m in summary["members"]]
    print(f"{name}: {np.mean(accuracy):.4f} ± {np.std(accuracy, ddof=1):.4f} "
          f"({summary['steps_per_s']:.1f} steps/s)", flush=True)
    return {"accuracy": stats(accuracy), "params": summary["num_params"], "steps": steps,
            "steps_per_s": summary["steps_per_s"]}


def paired(a: dict, b: dict) -> dict:
    return stats([x - y for x, y in zip(a["accuracy"]["per_seed"], b["accuracy"]["per_seed"],
                                        strict=True)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--only", default="", help="comma-separated run names (default: all)")
    parser.add_argument("--workdir", default=str(ROOT / "runs" / "distill_mnist1d"))
    parser.add_argument("--out", default=str(ROOT / "results"))
    parser.add_argument("--fresh", action="store_true",
                        help="delete earlier runs first (otherwise finished runs are reused)")
    args = parser.parse_args()
    root, out = Path(args.workdir), Path(args.out)
    specs = runs(root)
    wanted = args.only.split(",") if args.only else list(specs)
    results = {name: train(name, specs[name], args.seeds, root / name, args.fresh)
               for name in specs if name in wanted}
    if set(results) == set(specs):
        write(results, args.seeds, out)


def write(r: dict, seeds: int, out: Path) -> None:
    mean = {name: row["accuracy"]["mean"] for name, row in r.items()}
    small_kd = max(("small_cnn_kd", "small_cnn_kd_transfer", "small_cnn_hints_transfer"),
                   key=mean.get)
    figures = {
        "teacher": mean["teacher_cnn25"], "teacher_params": r["teacher_cnn25"]["params"],
        "mlp_alone": mean["mlp_alone"], "mlp_kd": mean["mlp_kd"],
        "mlp_kd_transfer": mean["mlp_kd_transfer"],
        "small_cnn_params": r["small_cnn_alone"]["params"],
        "small_cnn_teacher": mean["teacher_cnn128"],
        "small_cnn_teacher_params": r["teacher_cnn128"]["params"],
        "small_cnn_alone": mean["small_cnn_alone"], "small_cnn_kd": mean[small_kd],
        "small_cnn_kd_variant": small_kd,
        "small_cnn_params_fraction": r["small_cnn_alone"]["params"] / r["teacher_cnn128"]["params"],
        "teaching_members_test_accuracy": {
            "teacher_cnn25": r["teacher_cnn25"]["accuracy"]["per_seed"][0],
            "teacher_cnn128": r["teacher_cnn128"]["accuracy"]["per_seed"][0]},
    }
    comparisons = {
        "mlp_kd - mlp_alone": paired(r["mlp_kd"], r["mlp_alone"]),
        "mlp_kd_transfer - mlp_alone": paired(r["mlp_kd_transfer"], r["mlp_alone"]),
        f"{small_kd} - small_cnn_alone": paired(r[small_kd], r["small_cnn_alone"]),
        f"{small_kd} - teacher_cnn128 (same seeds)": paired(r[small_kd], r["teacher_cnn128"]),
        "small_cnn_hints_transfer - small_cnn_kd_transfer": paired(
            r["small_cnn_hints_transfer"], r["small_cnn_kd_transfer"]),
        "tiny_cnn_kd_transfer - tiny_cnn_alone": paired(r["tiny_cnn_kd_transfer"],
                                                        r["tiny_cnn_alone"]),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "distill_mnist1d.json").write_text(json.dumps(
        {"machine": machine(), "seeds": seeds, **figures, "runs": r,
         "paired_differences": comparisons}, indent=2) + "\n")
    lines = [
        "# Distillation on MNIST-1D", "",
        (f"Written by `experiments/distill_mnist1d.py` on {machine()}. Test accuracy, mean ± std "
        f"over {seeds} seeds (one population per row). Teachers: {TEACHER_STEPS} steps; "
        f"students: {STUDENT_STEPS} steps, Adam 1e-2, batch 100; member 0 of a teacher "
        "population teaches (its accuracy in the last column). KD: T 4, alpha 0.9; transfer: "
        f"{TRANSFER} fresh generator samples, soft loss only."), "",
        "| run | parameters | test accuracy | teacher (member 0) |", "|---|---|---|---|"]
    teacher_of = {"mlp_kd": "teacher_cnn25", "mlp_kd_transfer": "teacher_cnn25",
                  "tiny_cnn_kd_transfer": "teacher_cnn25"}
    for name, row in r.items():
        teacher = teacher_of.get(name, "teacher_cnn128" if "kd" in name or "hints" in name
                                 else None)
        used = (f"{teacher} {r[teacher]['accuracy']['per_seed'][0]:.4f}" if teacher else "—")
        a = row["accuracy"]
        lines.append(f"| {name} | {row['params']:,} | {a['mean']:.4f} ± {a['std']:.4f} | "
                     f"{used} |")
    lines += ["", "Paired differences (points, mean ± std over seeds):", "",
              "| comparison | Δ |", "|---|---|"]
    for name, d in comparisons.items():
        lines.append(f"| {name} | {100 * d['mean']:+.2f} ± {100 * d['std']:.2f} |")
    lines += ["", (f"Small CNN: {figures['small_cnn_params']:,} parameters, "
                   f"{figures['small_cnn_params_fraction']:.3f} of the wide CNN's; its best "
                   f"distilled variant is {small_kd}."), ""]
    (out / "distill_mnist1d.md").write_text("\n".join(lines))
    plot(r, out / "distill_mnist1d.png")


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(r)
    means = [100 * r[n]["accuracy"]["mean"] for n in names]
    stds = [100 * r[n]["accuracy"]["std"] for n in names]
    colors = ["tab:gray" if n.startswith("teacher") else
              "tab:blue" if n.endswith("alone") else "tab:orange" for n in names]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.barh(names, means, xerr=stds, color=colors)
    for i, m in enumerate(means):
        ax.text(m + 0.3, i, f"{m:.1f}", va="center", fontsize=8)
    ax.set_xlim(min(means) - 8, 100)
    ax.invert_yaxis()
    ax.set_xlabel("test accuracy (%), mean ± std over seeds")
    ax.set_title("MNIST-1D distillation: teachers (gray), alone (blue), distilled (orange)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
