"""Pruning: accuracy vs sparsity on the MNIST-1D CNN widened to 128 channels and on the digits
CNN, every curve one vmapped population (the target sparsity is a per-trial value), and the
headline points over 5 seeds paired with dense runs.

    .venv/bin/python experiments/prune_accuracy.py [--models mnist1d_cnn128,digits_cnn]
        [--parts headline,curves,probe] [--seeds 5] [--fresh] [--curve-methods rigl,...]

Headline (per model, 5 seeds): gradual magnitude pruning at sparsity 0 (exactly dense training:
every mask stays full), 0.9 and 0.95 in one population of 15; random pruning at 0.9, on the same
gradual schedule (only the score differs) and once at initialisation; 2:4; 50 %
of channels (L1); and the routes past 95 % (global magnitude; RigL with ERK) at 0.95. Members with
the same seed share initialisation and data order, so differences are paired.
Curves (seed 0): each method at 50, 80, 90, 95 and 98 % as one population.
Probe (`--parts probe`, the wide CNN): the issue's hand-written probe schedule (6000 steps, cubic
from step 1000 to 4000) for dense, gradual magnitude at 90 and 95 % and random at 90 %, 5 seeds.

Writes results/prune_accuracy.{md,json,png} and its keys of results/prune_summary.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from common import ROOT, SPLITS, machine, paired, stats, update_summary

from jaxopt_lab import choose, load_config, train_and_evaluate

# name: (config file, overrides, steps). 128 channels at a constant 1e-2 end noisy; a cosine
# decay settles them (see results/quantize_accuracy.md), so a paired difference means something.
# MNIST-1D's validation split is 1000 fresh generator examples (the paper's 4000 train and 1000
# test untouched); digits holds out 10 % of train (its config's default).
MODELS = {
    "mnist1d_cnn128": ("mnist1d_cnn.py", ["--config.model.channels=128",
                                          "--config.optim.schedule=cosine",
                                          "--config.data.generated_validation=1000"], 3000),
    "digits_cnn": ("digits_cnn.py", [], 2000),
}
P = "--config.techniques.prune"
CURVE = (0.5, 0.8, 0.9, 0.95, 0.98)


GRADUAL_WINDOW = (0.1, 0.6)  # the gradual schedule's begin and end, as fractions of training


def methods(steps: int, window: tuple[float, float] = GRADUAL_WINDOW) -> dict[str, list[str]]:
    """Each method's overrides: by default pruning from 10 % to 60 % of training, then 40 % to
    recover; `window` moves the gradual schedule's begin and end (fractions of training)."""
    begin, end, every = int(steps * window[0]), int(steps * window[1]), max(steps // 60, 1)
    gradual = [f"{P}.schedule=gradual", f"{P}.begin_step={begin}", f"{P}.end_step={end}",
               f"{P}.frequency={every}"]
    return {
        "gradual_magnitude": [f"{P}.method=magnitude", *gradual],
        "one_shot_magnitude": [f"{P}.method=magnitude", f"{P}.schedule=one_shot",
                               f"{P}.begin_step={end}"],
        "random": [f"{P}.method=random", *gradual],
        "random_at_init": [f"{P}.method=random", f"{P}.schedule=one_shot", f"{P}.begin_step=0"],
        "snip": [f"{P}.method=snip", f"{P}.schedule=one_shot", f"{P}.begin_step=0"],
        "global_magnitude": [f"{P}.method=magnitude", f"{P}.scope=global", *gradual],
        "erk_magnitude": [f"{P}.method=magnitude", f"{P}.distribution=erk", *gradual],
        "rigl": [f"{P}.method=rigl", f"{P}.schedule=one_shot", f"{P}.begin_step=0",
                 f"{P}.end_step={steps * 3 // 4}", f"{P}.frequency={max(steps // 30, 1)}",
                 f"{P}.distribution=erk"],
        "2:4": [f"{P}.method=magnitude", f"{P}.pattern=2:4", f"{P}.schedule=one_shot",
                f"{P}.begin_step={begin}"],
        # Filters of every conv, the first included (its input is untouched): only the logits
        # layer is kept whole, so the shrunk model has the shape of a narrower dense one.
        "channels_l1": [f"{P}.method=magnitude", f"{P}.pattern=channels", *gradual,
                        f"{P}.skip=('Dense_0',)"],
    }


def headline_runs() -> dict[str, tuple[str, tuple[float, ...]]]:
    """name: (method, sparsities); every sparsity runs for every seed."""
    return {"gradual_magnitude": ("gradual_magnitude", (0.0, 0.9, 0.95)),
            "random": ("random", (0.9,)), "random_at_init": ("random_at_init", (0.9,)),
            "2:4": ("2:4", (0.5,)),
            "global_magnitude": ("global_magnitude", (0.95,)), "rigl": ("rigl", (0.95,)),
            "channels_l1": ("channels_l1", (0.5,))}


def train(model: str, method: str, seeds: list[int], sparsities: list[float], workdir: Path,
          fresh: bool, steps: int | None = None,
          window: tuple[float, float] = GRADUAL_WINDOW) -> list[dict]:
    """One population (seeds × sparsities); its members' summaries. A finished run is reused.
    `steps` overrides the model's; `window` is the gradual schedule's (see `methods`)."""
    config_file, overrides, model_steps = MODELS[model]
    steps = steps or model_steps
    if fresh and workdir.exists():
        import shutil

        shutil.rmtree(workdir)
    pairs = [(s, q) for q in sparsities for s in seeds]
    population = (("seed", tuple(s for s, _ in pairs)),
                  ("techniques.prune.sparsity", tuple(q for _, q in pairs)))
    config = load_config(str(ROOT / "configs" / config_file), [
        *overrides, f"--config.train.steps={steps}", *methods(steps, window)[method],
        f"--config.population={population!r}", "--config.train.progress=False",
        "--config.train.measure=False", "--config.train.steps_per_call=1"])
    summary = train_and_evaluate(config, str(workdir))
    members = [{"seed": s, "sparsity": q, "test_accuracy": m["test_accuracy"],
                "validation_accuracy": m.get("validation_accuracy"),
                "measured_sparsity": m["sparsity"], "nonzero_params": m["nonzero_params"]}
               for (s, q), m in zip(pairs, summary["members"], strict=True)]
    print(f"{model} {method}: " + ", ".join(
        f"{q}: {np.mean([m['test_accuracy'] for m in members if m['sparsity'] == q]):.4f}"
        for q in sparsities) + f" ({summary['steps_per_s']:.1f} steps/s)", flush=True)
    return members


def accuracies(members: list[dict], sparsity: float, split: str = "test") -> list[float]:
    return [m[f"{split}_accuracy"] for m in sorted(members, key=lambda m: m["seed"])
            if m["sparsity"] == sparsity]


def headline(model: str, seeds: int, root: Path, fresh: bool) -> dict:
    runs = {name: train(model, method, list(range(seeds)), list(qs), root / "headline" / name,
                        fresh) for name, (method, qs) in headline_runs().items()}
    return paired_rows(runs, headline_runs())


# The hand-written probe: the config's own 6000 steps, layer-wise cubic pruning from step
# 1000 to 4000, first conv dense; here with 5 seeds and the cosine decay of the headline.
PROBE_STEPS, PROBE_WINDOW = 6000, (1 / 6, 2 / 3)
PROBE_RUNS = {"gradual_magnitude": ("gradual_magnitude", (0.0, 0.9, 0.95)),
              "random": ("random", (0.9,))}


def probe(model: str, seeds: int, root: Path, fresh: bool) -> dict:
    """Dense, gradual magnitude at 90 and 95 % and random at 90 % on the probe's schedule."""
    runs = {name: train(model, method, list(range(seeds)), list(qs), root / "probe" / name,
                        fresh, steps=PROBE_STEPS, window=PROBE_WINDOW)
            for name, (method, qs) in PROBE_RUNS.items()}
    return paired_rows(runs, PROBE_RUNS)


def paired_rows(runs: dict[str, list[dict]], table: dict) -> dict:
    """{"dense": ..., "<method> <sparsity>": ...}: accuracies and paired differences to the
    dense members (gradual magnitude at sparsity 0, which prunes nothing), on each split."""
    splits = [split for split in SPLITS  # runs before the validation split have none
              if all(m[f"{split}_accuracy"] is not None for ms in runs.values() for m in ms)]
    dense = {split: accuracies(runs["gradual_magnitude"], 0.0, split) for split in splits}
    rows = {"dense": {f"{split}_accuracy": stats(dense[split]) for split in splits}}
    for name, (_, qs) in table.items():
        for q in qs:
            if name == "gradual_magnitude" and q == 0.0:
                continue
            measured = [m["measured_sparsity"] for m in runs[name] if m["sparsity"] == q]
            row = rows[f"{name} {q:g}"] = {"method": name, "sparsity": q,
                                           "measured_sparsity": float(np.mean(measured))}
            for split in splits:
                acc = accuracies(runs[name], q, split)
                row[f"{split}_accuracy"] = stats(acc)
                row[f"{split}_paired_difference"] = paired(acc, dense[split])
    return rows


CURVE_METHODS = ("gradual_magnitude", "one_shot_magnitude", "random", "snip",
                 "global_magnitude", "rigl")


def curves(model: str, root: Path, fresh: bool, names: tuple[str, ...] = CURVE_METHODS) -> dict:
    result = {}
    for name in names:
        members = train(model, name, [0], list(CURVE), root / "curves" / name, fresh)
        result[name] = {f"{m['sparsity']:g}": m["test_accuracy"] for m in members}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--parts", default="headline,curves")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--curve-methods", default=",".join(CURVE_METHODS),
                        help="the curves to (re)run; the others keep their results")
    parser.add_argument("--workdir", default=str(ROOT / "runs" / "prune_accuracy"))
    parser.add_argument("--out", default=str(ROOT / "results"))
    parser.add_argument("--fresh", action="store_true",
                        help="delete earlier runs first (otherwise finished runs are reused)")
    args = parser.parse_args()
    out = Path(args.out)
    path = out / "prune_accuracy.json"
    results = json.loads(path.read_text())["models"] if path.exists() else {}
    for model in args.models.split(","):
        root = Path(args.workdir) / model
        entry = results.setdefault(model, {})
        entry["steps"] = MODELS[model][2]
        if "headline" in args.parts:
            entry["headline"] = headline(model, args.seeds, root, args.fresh)
            entry["seeds"] = args.seeds
        if "curves" in args.parts:
            names = tuple(args.curve_methods.split(","))
            unknown = sorted(set(names) - set(CURVE_METHODS))
            if unknown:
                parser.error(f"unknown --curve-methods {', '.join(unknown)}; allowed: "
                             f"{', '.join(CURVE_METHODS)}")
            entry["curves"] = {**entry.get("curves", {}),
                               **curves(model, root, args.fresh, names)}
        if "probe" in args.parts:
            entry["probe"] = probe(model, args.seeds, root, args.fresh)
            entry["probe_seeds"] = args.seeds
        write(results, out)


def best_95(headline_rows: dict) -> dict:
    """The route past 95 % with the best validation accuracy (2:4 is fixed at 50 %)."""
    return choose([r for r in headline_rows.values() if r.get("sparsity") == 0.95
                   and r["method"] != "2:4"], "validation_accuracy")


def summary_fields(results: dict) -> dict:
    """prune_accuracy's keys of results/prune_summary.json (mean test accuracies of the wide CNN),
    the validation figures beside them; recomputed from the results file by tests/test_results.py."""
    fields = {}
    rows = results.get("mnist1d_cnn128", {})
    for part, prefix in (("headline", ""), ("probe", "probe_")):
        if part not in rows:
            continue
        named = {"dense": "dense", "gradual_magnitude_90": "gradual_magnitude 0.9",
                 "random_90": "random 0.9"}
        if part == "probe":
            named["gradual_magnitude_95"] = "gradual_magnitude 0.95"
        for key, row in named.items():
            for split in SPLITS:
                figure = rows[part][row].get(f"{split}_accuracy")
                if figure is not None:
                    fields[f"{prefix}{key}_{split}_accuracy"] = figure["mean"]
    if "headline" in rows:
        best = best_95(rows["headline"])
        fields.update({"best_95_method": best["method"],
                       "best_95_test_accuracy": best["test_accuracy"]["mean"],
                       "best_95_validation_accuracy": best["validation_accuracy"]["mean"]})
    return fields


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "prune_accuracy.json").write_text(json.dumps(
        {"machine": machine(), "models": results}, indent=2) + "\n")
    update_summary(out / "prune_summary.json", summary_fields(results))
    lines = ["# Pruning: accuracy vs sparsity", "",
             (f"Written by `experiments/prune_accuracy.py` on {machine()}. Sparsity is the "
              "fraction of zeros among the prunable kernels (the first conv and the logits layer "
              "stay dense, the default `skip`); for channels_l1, the fraction of each conv's "
              "filters removed (the first conv's too; only the logits layer is kept whole). "
              "Gradual: cubic from 10 % to 60 % of training (the probe: its own steps). Δ is the "
              "mean paired difference in test accuracy to the dense run with the same seed, in "
              "points. Validation: MNIST-1D's is 1000 fresh generator examples (train and test "
              "are the paper's), digits' 10 % of train. Parts whose validation is \"not "
              "measured\" ran before the validation split existed; adding one does not change "
              "training (tests/test_generated_validation.py), so their test figures stand, but "
              "nothing is chosen on them. Compare figures within a part: parts ran at different "
              "times, and the code and the machine changed between them (the same seeds can land "
              "half a point apart)."), ""]
    for model, entry in results.items():
        titles = {"headline": f"headline, {entry.get('seeds')} seeds, {entry['steps']} steps",
                  "probe": (f"the issue's probe schedule, {entry.get('probe_seeds')} seeds, "
                            f"{PROBE_STEPS} steps, pruning from step "
                            f"{int(PROBE_STEPS * PROBE_WINDOW[0])} to "
                            f"{int(PROBE_STEPS * PROBE_WINDOW[1])}, cosine decay as above")}
        for part, title in titles.items():
            if part in entry:
                lines += [f"## {model}: {title}", "", *_paired_table(entry[part]), ""]
            if part == "headline" and model == "mnist1d_cnn128" and part in entry:
                best = best_95(entry[part])
                lines += [(f"Best route past 95 %, chosen on validation accuracy: "
                           f"**{best['method']}** (validation "
                           f"{best['validation_accuracy']['mean']:.4f}, test "
                           f"{best['test_accuracy']['mean']:.4f})."), ""]
        if "curves" in entry:
            lines += [f"## {model}: curves, seed 0 (test accuracy)", "",
                      "| method | " + " | ".join(f"{q:g}" for q in CURVE) + " |",
                      "|---|" + "---|" * len(CURVE)]
            for name, points in entry["curves"].items():
                lines.append(f"| {name} | " + " | ".join(
                    f"{points[f'{q:g}']:.4f}" for q in CURVE) + " |")
            lines.append("")
    (out / "prune_accuracy.md").write_text("\n".join(lines))
    plot(results, out / "prune_accuracy.png")
    print("\n".join(lines))


def _paired_table(rows: dict) -> list[str]:
    lines = [("| method | target | measured sparsity | validation accuracy | test accuracy "
              "| Δ test vs dense |"), "|---|---|---|---|---|---|",
             (f"| dense | 0 | 0 | {_acc(rows['dense'], 'validation')} | "
              f"{_acc(rows['dense'], 'test')} | — |")]
    for name, r in rows.items():
        if name != "dense":
            d = r["test_paired_difference"]
            lines.append(f"| {r['method']} | {r['sparsity']:g} | {r['measured_sparsity']:.4f} | "
                         f"{_acc(r, 'validation')} | {_acc(r, 'test')} | "
                         f"{100 * d['mean']:+.2f} ± {100 * d['std']:.2f} |")
    return lines


def _acc(row: dict, split: str) -> str:
    figure = row.get(f"{split}_accuracy")
    if figure is None:
        return "— (not measured)"
    return f"{figure['mean']:.4f} ± {figure['std']:.4f}"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    models = [m for m in results if "curves" in results[m]]
    if not models:
        return
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        for name, points in results[model]["curves"].items():
            ax.plot(list(CURVE), [points[f"{q:g}"] for q in CURVE], marker="o", label=name)
        if "headline" in results[model]:
            ax.axhline(results[model]["headline"]["dense"]["test_accuracy"]["mean"], color="black",
                       linestyle="--", linewidth=0.8, label="dense (5-seed mean)")
        ax.set_xscale("logit")
        ax.set_xticks(list(CURVE), [f"{q:g}" for q in CURVE])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("sparsity")
        ax.set_ylabel("test accuracy")
        ax.set_title(model)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
