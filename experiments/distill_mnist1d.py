"""Distillation on MNIST-1D: an MLP and a CNN 20x smaller than its teacher, each trained alone and
distilled (soft targets, a 40k-sample transfer set, feature hints), 5 seeds paired.

    .venv/bin/python experiments/distill_mnist1d.py [--seeds 5] [--fresh]

Teachers (the paper's recipe, `configs/mnist1d_cnn.py`: Adam 1e-2, batch 100, 6000 steps): the
25-channel CNN and the wide one (128 channels), each a population over the seeds; member 0 (seed
0) teaches. Students train for STUDENT_STEPS with the same optimizer, every variant one population
over the seeds, so a student's seed-s run alone and distilled share initialisation: differences
are paired. KD: T 4, alpha 0.9 (Hinton et al. 2015). The transfer set is 40k fresh MNIST-1D
samples (generator seed 1; the splits come from seed 42), labelled by the teacher only; its
logits are precomputed once (no augmentation, so they never change). Every run holds out 1000
other fresh samples (generator seed 2) for validation, on which the best distilled variant is
chosen; the paper's 4000 training and 1000 test samples are untouched.

Writes results/distill_mnist1d.{md,json,png}. Finished runs are reused and a stopped one resumes
from its last checkpoint (--fresh retrains).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
from common import ROOT, SPLITS, machine, paired, stats

from jaxopt_lab import choose, load_config, train_and_evaluate

TEACHER_STEPS = 6000
STUDENT_STEPS = 12000
TRANSFER = 40000
D = "--config.techniques.distill"
VALIDATION = "--config.data.generated_validation=1000"
SMALL_KD_VARIANTS = ("small_cnn_kd", "small_cnn_kd_transfer", "small_cnn_hints_transfer")


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
    """One population over the seeds; its members' accuracies on each split, and its size."""
    config_file, overrides, steps = spec
    if fresh and workdir.exists():
        shutil.rmtree(workdir)
    config = load_config(str(ROOT / "configs" / config_file), [
        *overrides, VALIDATION, f"--config.train.steps={steps}",
        f"--config.population=(('seed', {tuple(range(seeds))!r}),)",
        "--config.train.progress=False", "--config.train.measure=False"])
    summary = train_and_evaluate(config, str(workdir))
    accuracy = {split: [m[f"{split}_accuracy"] for m in summary["members"]] for split in SPLITS}
    print(f"{name}: test {np.mean(accuracy['test']):.4f} ± {np.std(accuracy['test'], ddof=1):.4f}"
          f" ({summary['steps_per_s']:.1f} steps/s)", flush=True)
    return {**{f"{split}_accuracy": stats(accuracy[split]) for split in SPLITS},
            "params": summary["num_params"], "steps": steps, "steps_per_s": summary["steps_per_s"]}


def small_cnn_kd_variant(r: dict) -> str:
    """The distilled small CNN variant with the best validation accuracy."""
    return choose([{"name": n, **r[n]} for n in SMALL_KD_VARIANTS], "validation_accuracy")["name"]


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


# The figures' keys (test means, as other tools read them) and the runs they come from.
FIGURES = {"teacher": "teacher_cnn25", "mlp_alone": "mlp_alone", "mlp_kd": "mlp_kd",
           "mlp_kd_transfer": "mlp_kd_transfer", "small_cnn_teacher": "teacher_cnn128",
           "small_cnn_alone": "small_cnn_alone"}


def figures(r: dict) -> dict:
    """The file's top-level figures: mean test accuracies (`<key>`) with the validation means
    beside them (`<key>_validation_accuracy`); the small CNN's distilled variant is chosen on
    validation. Recomputed from the runs' per-seed data by tests/test_results.py."""
    small_kd = small_cnn_kd_variant(r)
    runs = {**FIGURES, "small_cnn_kd": small_kd}
    out = {}
    for key, name in runs.items():
        out[key] = r[name]["test_accuracy"]["mean"]
        out[f"{key}_validation_accuracy"] = r[name]["validation_accuracy"]["mean"]
    return {**out, "small_cnn_kd_variant": small_kd,
            "teacher_params": r["teacher_cnn25"]["params"],
            "small_cnn_params": r["small_cnn_alone"]["params"],
            "small_cnn_teacher_params": r["teacher_cnn128"]["params"],
            "small_cnn_params_fraction": (r["small_cnn_alone"]["params"]
                                          / r["teacher_cnn128"]["params"]),
            # the member that taught (seed 0), not its population's mean
            "teaching_members_test_accuracy": {
                t: r[t]["test_accuracy"]["per_seed"][0] for t in ("teacher_cnn25",
                                                                   "teacher_cnn128")}}


def comparisons(r: dict) -> dict:
    """Paired differences on each split: {comparison: {"test": stats, "validation": stats}}."""
    small_kd = small_cnn_kd_variant(r)
    pairs = {"mlp_kd - mlp_alone": ("mlp_kd", "mlp_alone"),
             "mlp_kd_transfer - mlp_alone": ("mlp_kd_transfer", "mlp_alone"),
             f"{small_kd} - small_cnn_alone": (small_kd, "small_cnn_alone"),
             f"{small_kd} - teacher_cnn128 (same seeds)": (small_kd, "teacher_cnn128"),
             "small_cnn_hints_transfer - small_cnn_kd_transfer": ("small_cnn_hints_transfer",
                                                                  "small_cnn_kd_transfer"),
             "tiny_cnn_kd_transfer - tiny_cnn_alone": ("tiny_cnn_kd_transfer", "tiny_cnn_alone")}
    return {name: {split: paired(r[a][f"{split}_accuracy"]["per_seed"],
                                 r[b][f"{split}_accuracy"]["per_seed"]) for split in SPLITS}
            for name, (a, b) in pairs.items()}


def write(r: dict, seeds: int, out: Path) -> None:
    top, paired_differences = figures(r), comparisons(r)
    out.mkdir(parents=True, exist_ok=True)
    (out / "distill_mnist1d.json").write_text(json.dumps(
        {"machine": machine(), "seeds": seeds, **top, "runs": r,
         "paired_differences": paired_differences}, indent=2) + "\n")
    lines = [
        "# Distillation on MNIST-1D", "",
        (f"Written by `experiments/distill_mnist1d.py` on {machine()}. Accuracy, mean ± std "
         f"over {seeds} seeds (one population per row). Teachers: {TEACHER_STEPS} steps; "
         f"students: {STUDENT_STEPS} steps, Adam 1e-2, batch 100; member 0 of a teacher "
         "population teaches (its test accuracy in the last column). KD: T 4, alpha 0.9; "
         f"transfer: {TRANSFER} fresh generator samples, soft loss only. Validation: 1000 other "
         "fresh generator samples; the paper's training and test sets are untouched."), "",
        "| run | parameters | validation accuracy | test accuracy | teacher (member 0, test) |",
        "|---|---|---|---|---|"]
    teacher_of = {"mlp_kd": "teacher_cnn25", "mlp_kd_transfer": "teacher_cnn25",
                  "tiny_cnn_kd_transfer": "teacher_cnn25"}
    for name, row in r.items():
        teacher = teacher_of.get(name, "teacher_cnn128" if "kd" in name or "hints" in name
                                 else None)
        used = (f"{teacher} {r[teacher]['test_accuracy']['per_seed'][0]:.4f}" if teacher
                else "—")
        v, t = row["validation_accuracy"], row["test_accuracy"]
        lines.append(f"| {name} | {row['params']:,} | {v['mean']:.4f} ± {v['std']:.4f} | "
                     f"{t['mean']:.4f} ± {t['std']:.4f} | {used} |")
    lines += ["", "Paired differences (points, mean ± std over seeds):", "",
              "| comparison | Δ validation | Δ test |", "|---|---|---|"]
    for name, d in paired_differences.items():
        v, t = d["validation"], d["test"]
        lines.append(f"| {name} | {100 * v['mean']:+.2f} ± {100 * v['std']:.2f} | "
                     f"{100 * t['mean']:+.2f} ± {100 * t['std']:.2f} |")
    lines += ["", (f"Small CNN: {top['small_cnn_params']:,} parameters, "
                   f"{top['small_cnn_params_fraction']:.3f} of the wide CNN's; its best "
                   f"distilled variant on validation is {top['small_cnn_kd_variant']} (test "
                   f"{top['small_cnn_kd']:.4f})."), ""]
    (out / "distill_mnist1d.md").write_text("\n".join(lines))
    plot(r, out / "distill_mnist1d.png")


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(r)
    means = [100 * r[n]["test_accuracy"]["mean"] for n in names]
    stds = [100 * r[n]["test_accuracy"]["std"] for n in names]
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
