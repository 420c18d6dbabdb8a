"""bfloat16 against float32 training on the digits CNN and the MNIST-1D CNN, paired by seed.

    .venv/bin/python experiments/precision_accuracy.py [--seeds 5]
        [--variants float32,bfloat16,bfloat16_all]

Each variant trains all seeds as one population (one vmapped program; member i has seed i, so
the float32 and bfloat16 members with the same index share initialisation and data order) from
the model's own config, with only the precision changed: parameters and optimizer state stay
float32, the loss runs in float32. `bfloat16`: the default policy, the layers in bfloat16 but the
input-reading and the logits layer in float32 (`train.float32_layers`); `bfloat16_all`: every
layer in bfloat16 (`train.float32_layers=()`); float16 (dynamic loss scaling, default policy)
is a `--variants` choice too. Each model holds out validation (MNIST-1D: 1000
fresh generator examples, the paper's train and test untouched; digits: 10 % of train, its
config's default). The issue's goal: a mean paired test difference of at least -0.5 points. The
steps/s column is this machine's: on a CPU it says nothing about an accelerator's bfloat16 speed.

Writes results/precision_accuracy.{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
from common import (
    ROOT,
    SPLITS,
    machine,
    paired,
    plot_paired_differences,
    shown,
    split_accuracies,
    stats,
)

from jaxopt_lab import load_config, train_and_evaluate

# name: (config file, overrides); the configs' own step counts unless --steps says otherwise.
# MNIST-1D's validation split is 1000 fresh generator examples (its config holds out none).
MODELS = {"digits_cnn": ("digits_cnn.py", []),
          "mnist1d_cnn": ("mnist1d_cnn.py", ["--config.data.generated_validation=1000"])}
BASELINE = "float32"
VARIANTS = {  # name: overrides
    "float32": [],
    "bfloat16": ["--config.train.compute_dtype=bfloat16"],
    "bfloat16_all": ["--config.train.compute_dtype=bfloat16", "--config.train.float32_layers=()"],
    "float16": ["--config.train.compute_dtype=float16"],
}
GOAL_POINTS = -0.5


def train_variant(name: str, variant: str, seeds: int, steps: int | None, workroot: Path,
                  fresh: bool) -> dict:
    """The variant's summary (a population over seeds 0..seeds-1)."""
    config_file, overrides = MODELS[name]
    workdir = workroot / name / variant
    if fresh:
        shutil.rmtree(workdir, ignore_errors=True)
    extra = [f"--config.train.steps={steps}", f"--config.train.eval_every={steps}",
             f"--config.train.checkpoint_every={steps}",
             f"--config.train.log_every={min(100, steps)}"] if steps else []
    config = load_config(str(ROOT / "configs" / config_file), [
        *overrides, *extra, *VARIANTS[variant],
        f"--config.population=(('seed', {tuple(range(seeds))}),)",
        "--config.train.progress=False", "--config.train.measure=False",
        "--config.train.steps_per_call=1"])
    summary = train_and_evaluate(config, str(workdir))
    summary["config_steps"] = config.train.steps
    accuracies = [m["test_accuracy"] for m in summary["members"]]
    print(f"{name} {variant}: {np.mean(accuracies):.4f} ({summary['steps_per_s']:.1f} steps/s)",
          flush=True)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--variants", default="float32,bfloat16,bfloat16_all",
                        help=f"of {', '.join(VARIANTS)}; float32 (the baseline) is always trained")
    parser.add_argument("--steps", type=int, default=0, help="0: each config's own")
    parser.add_argument("--workdir", default=str(ROOT / "runs" / "precision_accuracy"))
    parser.add_argument("--out", default=str(ROOT / "results"))
    parser.add_argument("--name", default="precision_accuracy")
    parser.add_argument("--fresh", action="store_true",
                        help="delete earlier runs first (otherwise a finished run is reused)")
    args = parser.parse_args()
    variants = [BASELINE, *[v for v in args.variants.split(",") if v != BASELINE]]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; allowed: {', '.join(VARIANTS)}")
    results = {}
    for name in args.models.split(","):
        summaries = {v: train_variant(name, v, args.seeds, args.steps or None,
                                      Path(args.workdir), args.fresh) for v in variants}
        results[name] = {
            "steps": summaries[BASELINE]["config_steps"], **accuracy_rows(summaries),
            "steps_per_s": {v: s["steps_per_s"] for v, s in summaries.items()},
            "skipped_steps": {v: [m["skipped_steps"] for m in s["members"]]
                              for v, s in summaries.items() if "skipped_steps" in
                              s["members"][0]},
        }
    write(results, Path(args.out), args.seeds, args.name)


def accuracy_rows(summaries: dict[str, dict]) -> dict:
    """`<split>_accuracy` per variant and `<split>_paired_difference` to float32 (same seed), for
    each split that every variant was evaluated on."""
    accuracy = {v: split_accuracies(s["members"]) for v, s in summaries.items()}
    rows = {}
    for split in SPLITS:
        if all(split in a for a in accuracy.values()):
            values = {v: a[split] for v, a in accuracy.items()}
            rows[f"{split}_accuracy"] = {v: stats(a) for v, a in values.items()}
            rows[f"{split}_paired_difference"] = {v: paired(a, values[BASELINE])
                                                  for v, a in values.items() if v != BASELINE}
    return rows


def write(results: dict, out: Path, seeds: int, name: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    host = machine()
    (out / f"{name}.json").write_text(json.dumps(
        {"machine": host, "seeds": seeds, "goal_points": GOAL_POINTS, "models": results},
        indent=2) + "\n")
    lines = [
        "# Mixed precision: accuracy against float32",
        "",
        (f"Written by `experiments/precision_accuracy.py` on {host}. Accuracy, mean ± std "
         f"over {seeds} seeds; Δ is the mean paired difference in test accuracy to float32 "
         f"(same seed), in points (goal: ≥ {GOAL_POINTS}). Parameters and optimizer state stay "
         "float32 in every variant; only the precision differs: `bfloat16` computes in "
         "bfloat16 except the input-reading and the logits layer (the default "
         "`train.float32_layers`), `bfloat16_all` every layer in bfloat16. steps/s is this "
         "machine's (on a CPU it says nothing of an accelerator's bfloat16 speed). Validation: "
         "MNIST-1D's is 1000 fresh generator examples (train and test are the paper's), digits' "
         "10 % of train; \"not measured\": the run predates the validation split (adding one "
         "does not change training, so its test figures stand)."),
        "",
        ("| model | steps | precision | validation accuracy | test accuracy "
         "| Δ test vs float32 (points) | steps/s |"),
        "|---|---|---|---|---|---|---|",
    ]
    for model_name, r in results.items():
        for variant, s in r["test_accuracy"].items():
            d = r["test_paired_difference"].get(variant)
            validation = r.get("validation_accuracy", {}).get(variant)
            lines.append(f"| {model_name} | {r['steps']} | {variant} | {shown(validation)} | "
                         f"{shown(s)} | {shown(d, points=True) if d else '—'} | "
                         f"{r['steps_per_s'][variant]:.1f} |")
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    plot_paired_differences(results, out / f"{name}.png", "float32", GOAL_POINTS)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
