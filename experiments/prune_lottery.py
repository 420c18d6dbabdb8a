"""Lottery tickets on the MNIST-1D CNN: iterative magnitude pruning with rewinding to step 0
(Frankle & Carbin 2019) and to a late step k (Frankle et al. 2020), against a random
re-initialisation of the same masks, at every round's sparsity.

    .venv/bin/python experiments/prune_lottery.py [--seeds 5] [--steps 3000] [--rounds 5]
        [--fraction 0.37] [--rewind 100] [--channels 25]

Each round prunes `fraction` of the remaining prunable weights (global magnitude; the first conv
and the logits layer stay dense, the default `skip`), rewinds the survivors and retrains to
`steps`; the control trains the same masks from another seed's initialisation (seed + 1000) on
the same data. Paired by seed: Δ is ticket minus control per seed. Every run holds out 1000 fresh
generator examples for validation (the paper's train and test untouched); each row carries both
splits' accuracies (`<split>_accuracy`) and Δs (`<split>_paired_difference`), keyed by chain.

Writes results/prune_lottery.{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
from common import NOT_MEASURED, ROOT, SPLITS, machine, paired, shown, stats

from jaxopt_lab import load_config
from jaxopt_lab.core.evaluate import make_evaluator
from jaxopt_lab.run.build import build_run
from jaxopt_lab.techniques.prune import pruned_fraction
from jaxopt_lab.workflows.lottery import imp, lottery_config, make_trainer

CHAINS = ("rewind_0", "rewind_k")  # a row's tickets; each chain's control is reinit_0 / reinit_k


def evaluators(config, trainer) -> dict:
    """{split: stacked states -> one metrics dict per member}: the trainer evaluates on test
    only, so validation is the same evaluation over the run's validation split."""
    run = build_run(config, train=False)
    return {"validation": make_evaluator(run.experiment.eval_fn, run.dataset.validation,
                                         config.train.eval_batch_size, run.mesh, "validation",
                                         members=True),
            "test": trainer.evaluate}


def run(args) -> dict:
    config = lottery_config(load_config(str(ROOT / "configs" / "mnist1d_cnn.py"), [
        f"--config.model.channels={args.channels}", f"--config.train.steps={args.steps}",
        f"--config.optim.schedule={args.schedule}", "--config.data.generated_validation=1000"]))
    # XLA:CPU runs vmapped and scanned conv steps slower than single steps one by one.
    on_cpu = jax.default_backend() == "cpu"
    trainer = make_trainer(config, steps_per_call=1 if on_cpu else 10, vmap=not on_cpu)
    evaluate = evaluators(config, trainer)
    rows: dict[int, dict] = {}
    for r in imp(trainer, list(range(args.seeds)), rounds=args.rounds, fraction=args.fraction,
                 rewind_steps=(0, args.rewind), scope="global"):
        row = rows.setdefault(r.index, {"round": r.index, "sparsity": float(
            jax.vmap(pruned_fraction)(r.masks)[0])})
        name = "rewind_0" if r.rewind_step == 0 else "rewind_k"
        for split, fn in evaluate.items():
            accuracy = row.setdefault(f"{split}_accuracy", {})
            ticket = [e[f"{split}_accuracy"] for e in fn(r.ticket)]
            accuracy[name] = stats(ticket)
            if r.control is not None:
                control = [e[f"{split}_accuracy"] for e in fn(r.control)]
                accuracy[f"reinit_{name[-1]}"] = stats(control)
                row.setdefault(f"{split}_paired_difference", {})[name] = paired(ticket, control)
        test = row["test_accuracy"]
        print(f"round {r.index} rewind {r.rewind_step}: sparsity {row['sparsity']:.4f}, ticket "
              f"{test[name]['mean']:.4f}" + (f", re-init {test[f'reinit_{name[-1]}']['mean']:.4f}"
                                             if r.control is not None else ""), flush=True)
    return {"rows": [rows[i] for i in sorted(rows)]}


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "prune_lottery.json").write_text(json.dumps(results, indent=2) + "\n")
    s, k = results["settings"], results["settings"]["rewind"]
    lines = ["# Lottery tickets: IMP with rewinding vs random re-init", "",
             (f"Written by `experiments/prune_lottery.py` on {results['machine']} in "
              f"{results['wall_s'] / 60:.1f} min ({results['cpu_s'] / 60:.1f} min of CPU, on a "
              f"machine shared with other work). MNIST-1D CNN, {s['channels']} channels, Adam "
              f"1e-2 with a {s['schedule']} schedule, batch 100, {s['steps']} steps (the config's "
              f"6000 shortened); {s['seeds']} seeds, mean ± std of the final accuracy. Each "
              f"round prunes {100 * s['fraction']:g} % of the remaining prunable weights by global "
              f"magnitude (prunable: Conv_1 and Conv_2; Conv_0 and the logits layer stay dense), "
              f"rewinds the survivors to their state at step 0 or at step k = {k} "
              f"({100 * k / s['steps']:.1f} % of training: weights, optimizer state and data "
              f"position) and retrains to step {s['steps']}. Re-init: the same masks on another "
              f"seed's initialisation, trained from step 0 on the same data (at round 1 both chains "
              f"prune the same dense run, so their masks and re-inits coincide). Δ: ticket minus "
              "re-init, paired by seed, in points. Validation: 1000 fresh generator examples "
              "(train and test are the paper's)."), ""]
    for split in SPLITS:
        lines += _split_lines(results, split, k)
    (out / "prune_lottery.md").write_text("\n".join(lines))
    plot(results, out / "prune_lottery.png")
    print("\n".join(lines))


def _split_lines(results: dict, split: str, k: int) -> list[str]:
    """One split's table: tickets, controls and Δs per round."""
    lines = [f"## {split.capitalize()} accuracy", ""]
    if not any(f"{split}_accuracy" in row for row in results["rows"]):
        return [*lines, (f"{NOT_MEASURED}: this run predates the {split} split (adding one does "
                         "not change training, so the other figures stand)."), ""]
    lines += [(f"| round | sparsity | IMP rewind 0 | IMP rewind {k} | re-init (rewind-0 masks) | "
               f"re-init (rewind-{k} masks) | Δ rewind 0 | Δ rewind {k} |"),
              "|---|---|---|---|---|---|---|---|"]
    for row in results["rows"]:
        accuracy = row[f"{split}_accuracy"]
        delta = row.get(f"{split}_paired_difference", {})
        cells = [_cell(accuracy.get(n)) for n in (*CHAINS, "reinit_0", "reinit_k")]
        cells += [_cell(delta.get(n), points=True) for n in CHAINS]
        lines.append(f"| {row['round']} | {row['sparsity']:.4f} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _cell(entry: dict | None, points: bool = False) -> str:
    """A figure as `shown` writes it; "—" where the row has none (round 0 has no control)."""
    return shown(entry, points) if entry else "—"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = results["settings"]["rewind"]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, label in (("rewind_0", "IMP, rewind to 0"), ("rewind_k", f"IMP, rewind to {k}"),
                        ("reinit_0", "random re-init (rewind-0 masks)"),
                        ("reinit_k", f"random re-init (rewind-{k} masks)")):
        rows = [r for r in results["rows"] if name in r["test_accuracy"]]  # reported, not chosen
        test = [r["test_accuracy"][name] for r in rows]
        ax.errorbar([r["sparsity"] for r in rows], [t["mean"] for t in test],
                    yerr=[t["std"] for t in test], marker="o", capsize=3, label=label,
                    linestyle="--" if name.startswith("reinit") else "-")
    ax.set_xlabel("sparsity (fraction of prunable weights pruned)")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"MNIST-1D CNN: lottery tickets ({results['settings']['seeds']} seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--fraction", type=float, default=0.37)
    parser.add_argument("--rewind", type=int, default=100, help="the late rewind step k")
    parser.add_argument("--channels", type=int, default=25)
    parser.add_argument("--schedule", default="cosine")
    parser.add_argument("--out", default=str(ROOT / "results"))
    args = parser.parse_args()
    start, cpu = time.perf_counter(), time.process_time()
    results = run(args)
    write({"machine": machine(), "settings": {
        k: getattr(args, k) for k in ("seeds", "steps", "rounds", "fraction", "rewind", "channels",
                                      "schedule")},
        "wall_s": time.perf_counter() - start, "cpu_s": time.process_time() - cpu, **results},
        Path(args.out))


if __name__ == "__main__":
    main()
