"""Lottery tickets on the MNIST-1D CNN: iterative magnitude pruning with rewinding to step 0
(Frankle & Carbin 2019) and to a late step k (Frankle et al. 2020), against a random
re-initialisation of the same masks, at every round's sparsity.

    .venv/bin/python experiments/prune_lottery.py [--seeds 5] [--steps 3000] [--rounds 5]
        [--fraction 0.37] [--rewind 100] [--channels 25]

Each round prunes `fraction` of the remaining prunable weights (global magnitude; the first conv
and the logits layer stay dense, the default `skip`), rewinds the survivors and retrains to
`steps`; the control trains the same masks from another seed's initialisation (seed + 1000) on
the same data. Paired by seed: Δ is ticket minus control per seed.

Writes results/prune_lottery.{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
from common import ROOT, machine, stats

from jaxopt_lab import load_config
from jaxopt_lab.techniques.prune import pruned_fraction
from jaxopt_lab.workflows.lottery import imp, lottery_config, make_trainer


def run(args) -> dict:
    config = lottery_config(load_config(str(ROOT / "configs" / "mnist1d_cnn.py"), [
        f"--config.model.channels={args.channels}", f"--config.train.steps={args.steps}",
        f"--config.optim.schedule={args.schedule}"]))
    # XLA:CPU runs vmapped and scanned conv steps slower than single steps one by one.
    on_cpu = jax.default_backend() == "cpu"
    trainer = make_trainer(config, steps_per_call=1 if on_cpu else 10, vmap=not on_cpu)
    seeds = list(range(args.seeds))
    rows: dict[int, dict] = {}
    for r in imp(trainer, seeds, rounds=args.rounds, fraction=args.fraction,
                 rewind_steps=(0, args.rewind), scope="global"):
        row = rows.setdefault(r.index, {"round": r.index, "sparsity": float(
            jax.vmap(pruned_fraction)(r.masks)[0])})
        name = "rewind_0" if r.rewind_step == 0 else "rewind_k"
        ticket = [e["test_accuracy"] for e in trainer.evaluate(r.ticket)]
        row[name] = stats(ticket)
        if r.control is not None:
            control = [e["test_accuracy"] for e in trainer.evaluate(r.control)]
            row[f"reinit_{name[-1]}"] = stats(control)
            row[f"delta_{name[-1]}"] = stats([t - c for t, c in zip(ticket, control,
                                                                    strict=True)])
        print(f"round {r.index} rewind {r.rewind_step}: sparsity {row['sparsity']:.4f}, ticket "
              f"{row[name]['mean']:.4f}" + (f", re-init {row[f'reinit_{name[-1]}']['mean']:.4f}"
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
              f"6000 shortened); {s['seeds']} seeds, mean ± std of the final test accuracy. Each "
              f"round prunes {100 * s['fraction']:g} % of the remaining prunable weights by global "
              f"magnitude (prunable: Conv_1 and Conv_2; Conv_0 and the logits layer stay dense), "
              f"rewinds the survivors to their state at step 0 or at step k = {k} "
              f"({100 * k / s['steps']:.1f} % of training: weights, optimizer state and data "
              f"position) and retrains to step {s['steps']}. Re-init: the same masks on another "
              f"seed's initialisation, trained from step 0 on the same data (at round 1 both chains "
              f"prune the same dense run, so their masks and re-inits coincide). Δ: ticket minus "
              f"re-init, paired by seed, in points."), "",
             (f"| round | sparsity | IMP rewind 0 | IMP rewind {k} | re-init (rewind-0 masks) | "
              f"re-init (rewind-{k} masks) | Δ rewind 0 | Δ rewind {k} |"),
             "|---|---|---|---|---|---|---|---|"]
    for row in results["rows"]:
        cells = [_acc(row.get(n)) for n in ("rewind_0", "rewind_k", "reinit_0", "reinit_k")]
        deltas = [f"{100 * d['mean']:+.2f} ± {100 * d['std']:.2f}" if d else "—"
                  for d in (row.get("delta_0"), row.get("delta_k"))]
        lines.append(f"| {row['round']} | {row['sparsity']:.4f} | " + " | ".join(cells + deltas)
                     + " |")
    (out / "prune_lottery.md").write_text("\n".join(lines) + "\n")
    plot(results, out / "prune_lottery.png")
    print("\n".join(lines))


def _acc(entry: dict | None) -> str:
    return f"{entry['mean']:.4f} ± {entry['std']:.4f}" if entry else "—"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = results["settings"]["rewind"]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, label in (("rewind_0", "IMP, rewind to 0"), ("rewind_k", f"IMP, rewind to {k}"),
                        ("reinit_0", "random re-init (rewind-0 masks)"),
                        ("reinit_k", f"random re-init (rewind-{k} masks)")):
        rows = [r for r in results["rows"] if name in r]
        ax.errorbar([r["sparsity"] for r in rows], [r[name]["mean"] for r in rows],
                    yerr=[r[name]["std"] for r in rows], marker="o", capsize=3, label=label,
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
