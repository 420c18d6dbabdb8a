"""Structured pruning that really shrinks: 50 % of the wide MNIST-1D CNN's channels (L1, gradual),
surgery (`prune.shrink`) into a dense CNN of half the width, then fine-tuning; accuracy paired
with dense runs of the same seeds, and size, FLOPs and CPU latency against the dense model.

    .venv/bin/python experiments/prune_structured.py [--finetune-steps 1000]
        [--finetune-lr 1e-3] [--wait] [--fresh]

The pruned and the dense population are experiments/prune_accuracy.py's headline runs
(runs/prune_accuracy/mnist1d_cnn128/headline/{channels_l1,gradual_magnitude}, the latter's
sparsity-0 members being exactly dense training); --wait polls for them while that script trains
them, otherwise a missing one is trained here with its arguments. Each seed's member is shrunk
in runs/prune_structured/seed{s}/shrunk (seed{s} is a view of the population: links to its config
and checkpoints), checked against the masked model, and fine-tuned in seed{s}/finetuned as a new run
from the shrunk weights (`train.init_from`): a fresh Adam, cosine decay from --finetune-lr over
--finetune-steps, the config's own protocol (all 4000 training examples). Validation: the 1000 fresh generator examples the
headline runs hold out (the shrunk run's config keeps them); rows carry both splits' accuracies,
test only where the headline runs predate the split.
Latency: the dense 128-channel member, the shrunk one and a dense 64-channel CNN of the same
shape (the reference the issue names), interleaved in every round; the best round is reported.

Writes results/prune_structured.{md,json,png} and its keys of results/prune_summary.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import jax
import numpy as np
from common import ROOT, SPLITS, machine, paired, shown, split_accuracies, stats, update_summary
from prune_accuracy import train

from jaxopt_lab import load_config, load_run, train_and_evaluate
from jaxopt_lab.core.measure import count_flops, latency_ms, model_bytes
from jaxopt_lab.core.state import sample_input
from jaxopt_lab.core.tasks import inference
from jaxopt_lab.models import CNN1D
from jaxopt_lab.workflows.shrink import shrink_run

HEADLINE = ROOT / "runs" / "prune_accuracy" / "mnist1d_cnn128" / "headline"
POPULATIONS = {"channels_l1": (0.5,), "gradual_magnitude": (0.0, 0.9, 0.95)}
SEEDS = list(range(5))
ROUNDS = 15
TOLERANCE = 1e-4  # max |logit difference| of the shrunk vs the masked model
# The models each seed's row compares, in order: dense, the masked pruned member, the shrunk one
# before and after fine-tuning.
STAGES = ("dense", "masked", "shrunk_before_finetune", "finetuned")


def population(name: str, wait: bool) -> list[dict]:
    """The members of headline population `name`, waited for (--wait) or trained if missing."""
    path = HEADLINE / name / "summary.json"
    while wait and not path.exists():
        time.sleep(60)
    if not path.exists():
        train("mnist1d_cnn128", name, SEEDS, list(POPULATIONS[name]), HEADLINE / name, False)
    return json.loads(path.read_text())["members"]


def index(members: list[dict], seed: int, sparsity: float) -> int:
    return next(i for i, m in enumerate(members) if m["values"]["seed"] == seed
                and m["values"]["techniques.prune.sparsity"] == sparsity)


def shrink_member(view: Path, member: int) -> dict:
    """shrink_run of one member into view/shrunk; its summary, kept in view/shrink.json."""
    saved = view / "shrink.json"
    if saved.exists():
        return json.loads(saved.read_text())
    view.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "checkpoints"):
        if not (view / name).exists():
            (view / name).symlink_to(HEADLINE / "channels_l1" / name)
    summary = shrink_run(str(view), member=member)
    saved.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def finetune(shrunk: Path, steps: int, lr: float) -> dict:
    """A new run next to `shrunk` that starts from its weights (finished ones are read back)."""
    workdir = shrunk.parent / "finetuned"
    finished = workdir / "summary.json"
    if finished.exists() and json.loads(finished.read_text())["steps"] == steps:
        return json.loads(finished.read_text())
    config = load_config(str(shrunk / "config.py"), [
        f"--config.train.steps={steps}", f"--config.optim.lr={lr}",
        f"--config.train.init_from={shrunk}", "--config.train.progress=False",
        "--config.train.measure=False", "--config.train.steps_per_call=100"])
    return train_and_evaluate(config, str(workdir))


def seeds_table(pruned: list[dict], dense: list[dict], root: Path, steps: int,
                lr: float) -> list[dict]:
    """A row per seed: each stage's accuracy on each split that every stage was evaluated on."""
    rows = []
    for seed in SEEDS:
        member = index(pruned, seed, 0.5)
        shrunk = shrink_member(root / f"seed{seed}", member)
        tuned = finetune(root / f"seed{seed}" / "shrunk", steps, lr)
        accuracy = split_accuracies([dense[index(dense, seed, 0.0)], pruned[member], shrunk,
                                     tuned])
        rows.append({
            "seed": seed, "member": member, "from_step": shrunk["from_step"],
            **{f"{split}_accuracy": dict(zip(STAGES, values, strict=True))
               for split, values in accuracy.items()},
            "max_abs_output_difference": shrunk["max_abs_output_difference"],
            "widths": [g["channels"] for g in shrunk["groups"]]})
        print(f"seed {seed}: " + ", ".join(f"{k} {v}" for k, v in rows[-1].items()), flush=True)
    return rows


def speed(root: Path) -> dict:
    """Params, FLOPs, bytes and interleaved latencies of dense 128, shrunk, dense 64."""
    dense_run = load_run(str(HEADLINE / "gradual_magnitude"))
    i = index([{"values": v} for v in dense_run.members], 0, 0.0)
    # Device arrays for every form: numpy arguments would be copied in on every call.
    dense = jax.tree.map(lambda a: a[i], {"params": dense_run.state.params,
                                          **dense_run.state.model_state})
    shrunk_run = load_run(str(root / "seed0" / "shrunk"))
    shrunk = {"params": shrunk_run.state.params, **shrunk_run.state.model_state}
    sample_x = sample_input(dense_run.dataset)
    reference = CNN1D(dense_run.dataset.num_classes, channels=64)
    forms = {"dense_128": (dense_run.experiment.model, dense),
             "shrunk": (shrunk_run.experiment.model, shrunk),
             "dense_64": (reference, reference.init(jax.random.key(0), sample_x))}
    rounds = {form: {1: [], 256: []} for form in forms}
    for _ in range(ROUNDS):
        for form, (model, variables) in forms.items():
            for b in (1, 256):
                rounds[form][b].append(latency_ms(inference(model), sample_x, b,
                                                  variables=variables, runs=20))
    result = {}
    for form, (model, variables) in forms.items():
        # Within-round ratios: each round timed every form back to back.
        ratios = {b: [d / s for d, s in zip(rounds["dense_128"][b], rounds[form][b], strict=True)]
                  for b in (1, 256)}
        result[form] = {
            "num_params": sum(int(np.size(a)) for a in jax.tree.leaves(variables["params"])),
            "flops_per_example": count_flops(inference(model), variables, sample_x),
            "model_bytes": model_bytes(variables),
            "channels": list(model.channels_per_conv),
            **{f"latency_ms_batch{b}": min(rounds[form][b]) for b in (1, 256)},
            **{f"speedup_batch{b}": min(rounds["dense_128"][b]) / min(rounds[form][b])
               for b in (1, 256)},
            **{f"latency_ms_batch{b}_rounds": rounds[form][b] for b in (1, 256)},
            **{f"median_round_speedup_batch{b}": statistics.median(ratios[b]) for b in (1, 256)},
            **{f"round_speedup_batch{b}_range": [min(ratios[b]), max(ratios[b])]
               for b in (1, 256)}}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--finetune-steps", type=int, default=1000)
    parser.add_argument("--finetune-lr", type=float, default=1e-3)
    parser.add_argument("--wait", action="store_true",
                        help="poll for the headline runs while prune_accuracy.py trains them")
    parser.add_argument("--workdir", default=str(ROOT / "runs" / "prune_structured"))
    parser.add_argument("--out", default=str(ROOT / "results"))
    parser.add_argument("--fresh", action="store_true", help="delete earlier shrunk runs first")
    args = parser.parse_args()
    root = Path(args.workdir)
    if args.fresh and root.exists():
        shutil.rmtree(root)
    pruned = population("channels_l1", args.wait)
    dense = population("gradual_magnitude", args.wait)
    start = time.perf_counter()
    rows = seeds_table(pruned, dense, root, args.finetune_steps, args.finetune_lr)
    results = {"machine": machine(), "finetune_steps": args.finetune_steps,
               "finetune_lr": args.finetune_lr, "seeds": rows, **seed_means(rows),
               "speed": speed(root)}
    results["wall_s"] = time.perf_counter() - start
    write(results, Path(args.out))


def seed_means(rows: list[dict]) -> dict:
    """Per split the rows have: `<split>_accuracy` (each stage's `stats` over seeds) and
    `<split>_paired_difference` (fine-tuned minus dense, paired by seed)."""
    means = {}
    for split in SPLITS:
        if all(f"{split}_accuracy" in r for r in rows):
            values = {k: [r[f"{split}_accuracy"][k] for r in rows] for k in STAGES}
            means[f"{split}_accuracy"] = {k: stats(v) for k, v in values.items()}
            means[f"{split}_paired_difference"] = paired(values["finetuned"], values["dense"])
    return means


def summary_fields(results: dict) -> dict:
    """prune_structured's keys of results/prune_summary.json. `structured_50_test_accuracy` is
    after fine-tuning, `finetune_steps` more than the dense run trained; the like-for-like
    figure (the same steps as dense) is the shrunk model before fine-tuning. Recomputed from the
    results file by tests/test_results.py."""
    acc = results["test_accuracy"]
    return {"structured_dense_test_accuracy": acc["dense"]["mean"],
            "structured_50_test_accuracy": acc["finetuned"]["mean"],
            "structured_50_finetune_extra_steps": results["finetune_steps"],
            "structured_50_like_for_like_test_accuracy": acc["shrunk_before_finetune"]["mean"],
            "structured_50_speedup_batch256": results["speed"]["shrunk"]["speedup_batch256"]}


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "prune_structured.json").write_text(json.dumps(results, indent=2) + "\n")
    update_summary(out / "prune_summary.json", summary_fields(results))
    lines = ["# Structured pruning: 50 % of channels → surgery → fine-tune", "",
             (f"Written by `experiments/prune_structured.py` on {results['machine']}. The "
              "MNIST-1D CNN at 128 channels, 3000 steps; L1 channel pruning of 50 % of the "
              "filters of every conv (only the logits layer is kept whole), gradual, cubic, "
              "steps 300 → 1800; shrunk by "
              f"`prune.shrink`, then fine-tuned {results['finetune_steps']} steps (Adam, cosine "
              f"from {results['finetune_lr']:g}), so the fine-tuned model has trained "
              f"{results['finetune_steps']} steps more than the dense one: before fine-tuning is "
              "the like-for-like budget. Dense: the same seeds trained without pruning. "
              f"Max |shrunk − masked| logit difference ≤ {TOLERANCE:g} is the surgery check. "
              f"Took {results['wall_s'] / 60:.1f} min (shrink, fine-tune, timing). Validation: "
              "1000 fresh generator examples (train and test are the paper's); \"not "
              "measured\": the runs predate the validation split (adding one does not change "
              "training, so their test figures stand)."), "",
             *_accuracy_lines(results),
             (f"Size and CPU inference latency (best of {ROUNDS} interleaved rounds, each the "
               "median of 20 calls; speedup = dense 128 latency / this; in brackets the median "
               "of the per-round ratios and their range; every round in the JSON):"), "",
              ("| model | channels | params | FLOPs / example | bytes | batch 1 ms | "
               "batch 256 ms | speedup b1 | speedup b256 |"),
              "|---|---|---|---|---|---|---|---|---|"]
    for form, s in results["speed"].items():
        lines.append(
            f"| {form} | {s['channels']} | {s['num_params']} | {s['flops_per_example']} | "
            f"{s['model_bytes']} | {s['latency_ms_batch1']:.3f} | "
            f"{s['latency_ms_batch256']:.3f} | {s['speedup_batch1']:.2f}× "
            f"({_median_range(s, 1)}) | {s['speedup_batch256']:.2f}× ({_median_range(s, 256)}) |")
    (out / "prune_structured.md").write_text("\n".join(lines) + "\n")
    plot(results, out / "prune_structured.png")
    print("\n".join(lines))


def _median_range(speed: dict, batch: int) -> str:
    low, high = speed[f"round_speedup_batch{batch}_range"]
    return f"{speed[f'median_round_speedup_batch{batch}']:.2f}×, {low:.2f}–{high:.2f}"


def _accuracy_lines(results: dict) -> list[str]:
    """Test accuracy per seed, then each split's means and the paired fine-tuned − dense Δ."""
    lines = ["Test accuracy per seed:", "",
             "| seed | dense | masked 50 % | shrunk, before FT | after FT | max abs diff | widths |",
             "|---|---|---|---|---|---|---|"]
    for r in results["seeds"]:
        lines.append(f"| {r['seed']} | " + " | ".join(
            f"{r['test_accuracy'][k]:.4f}" for k in STAGES)
            + f" | {r['max_abs_output_difference']:.1e} | {r['widths']} |")
    lines += ["", "Mean ± std over the seeds:", "",
              ("| split | dense | masked 50 % | shrunk, before FT | after FT "
               "| after FT − dense (paired, points) |"), "|---|---|---|---|---|---|"]
    for split in SPLITS:
        acc = results.get(f"{split}_accuracy", {})
        d = results.get(f"{split}_paired_difference")
        lines.append(f"| {split} | " + " | ".join(shown(acc.get(k)) for k in STAGES)
                     + f" | {shown(d, points=True)} |")
    return [*lines, ""]


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    acc = results["test_accuracy"]
    left.bar(range(len(acc)), [a["mean"] for a in acc.values()],
             yerr=[a["std"] for a in acc.values()], capsize=4)
    left.set_xticks(range(len(acc)), [k.replace("_", " ") for k in acc], fontsize=8)
    left.set_ylim(min(a["mean"] for a in acc.values()) - 0.03, 1.0)
    left.set_ylabel("test accuracy (5 seeds)")
    speeds = {k: v for k, v in results["speed"].items() if k != "dense_128"}
    for j, b in enumerate((1, 256)):
        right.bar([x + 0.4 * j for x in range(len(speeds))],
                  [s[f"speedup_batch{b}"] for s in speeds.values()], width=0.4,
                  label=f"batch {b}")
    right.axhline(1.0, color="black", linewidth=0.8)
    right.axhline(2.0, color="grey", linestyle="--", linewidth=0.8, label="2× (done-when)")
    right.set_xticks([x + 0.2 for x in range(len(speeds))], list(speeds))
    right.set_ylabel("CPU speedup over dense 128 channels")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
