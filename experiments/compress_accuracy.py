"""Compressed gradients on 4 simulated devices: test accuracy and bytes per step of each
compressor against the exact all-reduce, and the cost model's projection to many workers.

    .venv/bin/python experiments/compress_accuracy.py [--parts headline,methods] [--seeds 5]
        [--models mnist1d_cnn128,digits_cnn] [--steps 2000]

The global batch is the single-device config's (100 on MNIST-1D, 64 on digits), split over 4
devices. Headline (the wide MNIST-1D CNN, 5 seeds paired, each method one population over the
seeds): exact all-reduce, PowerSGD rank 2, top-k 1 % with and without error feedback. Methods
(seed 0): every compressor and variant. Bytes are what a device hands to collectives per step,
averaged over the run (PowerSGD's first 10 steps are exact all-reduces); the compressor's own
cost is the step time against the all-reduce's in the same script, on this machine. Each model
holds out validation (MNIST-1D: 1000 fresh generator examples, the paper's train and test
untouched; digits: 10 % of train, its config's default); rows carry both splits' accuracies.

Writes results/compress_accuracy.{md,json,png} and results/compress_summary.json.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

import argparse
import json
import shutil
from pathlib import Path

import jax
import numpy as np
from common import NOT_MEASURED, ROOT, machine, paired, split_accuracies, stats, update_summary

from jaxopt_lab import load_config, load_run, train_and_evaluate
from jaxopt_lab.techniques.compress import cost
from jaxopt_lab.techniques.compress.powersgd import matrix_shape

C = "--config.techniques.compress"
# MNIST-1D's validation split is 1000 fresh generator examples; digits holds out 10 % of train.
MODELS = {
    "mnist1d_cnn128": ("mnist1d_cnn.py", ["--config.model.channels=128",
                                          "--config.optim.schedule=cosine",
                                          "--config.data.generated_validation=1000"]),
    "digits_cnn": ("digits_cnn.py", []),
}
VARIANTS = {
    "allreduce": ["none"],
    "topk_1pct_ef": ["topk", f"{C}.ratio=0.01", f"{C}.error_feedback=True"],
    "topk_1pct_no_ef": ["topk", f"{C}.ratio=0.01", f"{C}.error_feedback=False"],
    "randomk_1pct_ef": ["randomk", f"{C}.ratio=0.01", f"{C}.error_feedback=True"],
    "powersgd_r1": ["powersgd", f"{C}.rank=1"],
    "powersgd_r2": ["powersgd", f"{C}.rank=2"],
    "powersgd_r4": ["powersgd", f"{C}.rank=4"],
    "signsgd_ef": ["signsgd", f"{C}.error_feedback=True"],
    "signsgd_no_ef": ["signsgd", f"{C}.error_feedback=False"],
    # QSGD's sign x level takes ceil(log2(2 levels + 1)) bits packed: 6 at 16 levels, 4 at 7
    "qsgd_16levels_6bit": ["qsgd", f"{C}.levels=16"],
    "qsgd_7levels_4bit": ["qsgd", f"{C}.levels=7"],
    "int8": ["int8"],
}
HEADLINE = ("allreduce", "powersgd_r2", "topk_1pct_ef", "topk_1pct_no_ef")


def train(model: str, variant: str, seeds: list[int], steps: int, workdir: Path,
          fresh: bool) -> dict:
    """One population over the seeds (a single run for one seed); accuracies, bytes, speed. A
    finished run is read back, not rerun."""
    if fresh and workdir.exists():
        shutil.rmtree(workdir)
    config_file, overrides = MODELS[model]
    method, *options = VARIANTS[variant]
    population = [f"--config.population=(('seed', {tuple(seeds)!r}),)"] if len(seeds) > 1 else []
    config = load_config(str(ROOT / "configs" / config_file), [
        *overrides, f"--config.train.steps={steps}", f"{C}.method={method}", *options,
        *population, "--config.train.progress=False", "--config.train.measure=False",
        "--config.train.steps_per_call=1", f"--config.train.log_every={steps // 20}"])
    finished = workdir / "summary.json"
    if finished.exists() and json.loads(finished.read_text())["steps"] == steps:
        summary = json.loads(finished.read_text())  # its own speed: a rerun would measure none
    else:
        summary = train_and_evaluate(config, str(workdir))
    accuracy = split_accuracies(summary.get("members", [summary]))
    row = {"method": method,
           **{f"{split}_accuracy": stats(values) for split, values in accuracy.items()},
           "comm_bytes_per_step": summary["comm_bytes_per_step"],
           "comm_ratio": summary["comm_ratio"], "steps_per_s": summary["steps_per_s"],
           "techniques": summary["techniques"].get("compress", {"method": "none"})}
    print(f"{model} {variant}: test {np.mean(accuracy['test']):.4f} ({summary['comm_ratio']:.1f}x "
          f"fewer bytes, {summary['steps_per_s']:.1f} steps/s)", flush=True)
    return row


def plain_bytes(workdir: Path, method: str, options: dict) -> float:
    """Bytes of the tensors a method leaves uncompressed (they go through one all-reduce)."""
    shapes = [p.shape for p in jax.tree.leaves(load_run(str(workdir)).state.params)]
    min_size = options.get("min_size", 1024)
    if method == "powersgd":
        kept = [s for s in shapes if matrix_shape(s, options["rank"], min_size) is None]
    else:
        kept = [s for s in shapes if int(np.prod(s)) < min_size]
    return float(sum(4 * int(np.prod(s)) for s in kept))


def projections(rows: dict, root: Path) -> dict:
    """The cost model at 8 to 1024 workers, 1, 10 and 100 Gb/s, from this run's measurements:
    compute per step = the all-reduce run's step time here (4 simulated devices, whose exchange
    is a memory copy), a compressor's overhead = its extra step time."""
    base_s = 1.0 / rows["allreduce"]["steps_per_s"]
    costs = {}
    for name, row in rows.items():
        kind = row["method"]
        plain = 0.0 if kind == "none" else min(
            plain_bytes(root / name, kind, row["techniques"]), row["comm_bytes_per_step"])
        costs[name] = cost.step_costs(kind, base_s, row["comm_bytes_per_step"],
                                      overhead_s=max(0.0, 1.0 / row["steps_per_s"] - base_s),
                                      plain_bytes=plain)
    return {"compute_s": base_s, "rows": cost.projection_table(costs, baseline="allreduce")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--parts", default="headline,methods")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--workdir", default=str(ROOT / "runs" / "compress_accuracy"))
    parser.add_argument("--out", default=str(ROOT / "results"))
    parser.add_argument("--fresh", action="store_true",
                        help="delete earlier runs first (otherwise finished runs are reused)")
    args = parser.parse_args()
    out = Path(args.out)
    path = out / "compress_accuracy.json"
    results = json.loads(path.read_text())["models"] if path.exists() else {}
    for model in args.models.split(","):
        root = Path(args.workdir) / model
        entry = results.setdefault(model, {})
        entry["steps"] = args.steps
        if "headline" in args.parts and model == "mnist1d_cnn128":
            entry["seeds"] = args.seeds
            entry["headline"] = {v: train(model, v, list(range(args.seeds)), args.steps,
                                          root / "headline" / v, args.fresh) for v in HEADLINE}
            write(results, out)
        if "methods" in args.parts:
            entry["methods"] = {}
            for v in VARIANTS:
                entry["methods"][v] = train(model, v, [0], args.steps, root / "methods" / v,
                                            args.fresh)
                write(results, out)
            entry["projection"] = projections(entry["methods"], root / "methods")
            write(results, out)


def summary_fields(results: dict) -> dict:
    """results/compress_summary.json's figures (the wide CNN's headline: mean test accuracies,
    bytes ratios); recomputed from the results file by tests/test_results.py."""
    head = results["mnist1d_cnn128"]["headline"]
    return {"seeds": results["mnist1d_cnn128"]["seeds"],
            "allreduce_test_accuracy": head["allreduce"]["test_accuracy"]["mean"],
            "powersgd_r2_test_accuracy": head["powersgd_r2"]["test_accuracy"]["mean"],
            "powersgd_r2_comm_ratio": head["powersgd_r2"]["comm_ratio"],
            "topk_1pct_ef_test_accuracy": head["topk_1pct_ef"]["test_accuracy"]["mean"],
            "topk_1pct_ef_comm_ratio": head["topk_1pct_ef"]["comm_ratio"],
            "topk_1pct_no_ef_test_accuracy": head["topk_1pct_no_ef"]["test_accuracy"]["mean"]}


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "compress_accuracy.json").write_text(json.dumps(
        {"machine": machine(), "devices": jax.device_count(), "models": results}, indent=2) + "\n")
    head = results.get("mnist1d_cnn128", {}).get("headline", {})
    if set(head) == set(HEADLINE):
        update_summary(out / "compress_summary.json",
                       {"machine": machine(), **summary_fields(results)})
    lines = ["# Compressed gradients: accuracy, bytes and projected step time", "",
             (f"Written by `experiments/compress_accuracy.py` on {machine()}, {jax.device_count()}"
              " simulated devices, global batch as the single-device config. Bytes: what one "
              "device hands to collectives per step, mean over the run (indices included); "
              "ratio = the exact all-reduce's bytes / these. Step time relative to the "
              "all-reduce's measured here (the compressor's own compute; the exchange between "
              "simulated devices is a memory copy). Validation: MNIST-1D's is 1000 fresh "
              "generator examples (train and test are the paper's), digits' 10 % of train; \"not "
              "measured\": the run predates the validation split (adding one does not change "
              "training, so its test figures stand)."), ""]
    for model, entry in results.items():
        if "headline" in entry:
            h = entry["headline"]
            base = h["allreduce"]["test_accuracy"]["per_seed"]
            lines += [f"## {model}: headline, {entry['seeds']} seeds paired, {entry['steps']} steps",
                      "", ("| method | validation accuracy | test accuracy | Δ test vs all-reduce "
                           "(points) | bytes/step | fewer bytes |"), "|---|---|---|---|---|---|"]
            for name, r in h.items():
                d = paired(r["test_accuracy"]["per_seed"], base)
                lines.append(f"| {name} | {_acc(r, 'validation')} | {_acc(r, 'test')} | "
                             f"{100 * d['mean']:+.2f} ± {100 * d['std']:.2f} | "
                             f"{r['comm_bytes_per_step']:,.0f} | {r['comm_ratio']:.1f}× |")
            lines.append("")
        if "methods" in entry:
            m = entry["methods"]
            base_rate = m.get("allreduce", {}).get("steps_per_s")
            lines += [f"## {model}: every method, seed 0, {entry['steps']} steps", "",
                      ("| method | validation accuracy | test accuracy | bytes/step | fewer bytes "
                       "| step time vs all-reduce |"), "|---|---|---|---|---|---|"]
            for name, r in m.items():
                slow = f"{base_rate / r['steps_per_s']:.2f}×" if base_rate else "—"
                lines.append(f"| {name} | {_acc(r, 'validation')} | {_acc(r, 'test')} | "
                             f"{r['comm_bytes_per_step']:,.0f} | {r['comm_ratio']:.1f}× | "
                             f"{slow} |")
            lines.append("")
        if "projection" in entry:
            lines += _projection_lines(model, entry["projection"])
    (out / "compress_accuracy.md").write_text("\n".join(lines))
    plot(results, out / "compress_accuracy.png")


def _acc(row: dict, split: str) -> str:
    a = row.get(f"{split}_accuracy")
    if a is None:
        return NOT_MEASURED
    return f"{a['mean']:.4f}" + (f" ± {a['std']:.4f}" if len(a["per_seed"]) > 1 else "")


def _projection_lines(model: str, projection: dict) -> list[str]:
    rows = projection["rows"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lines = [f"### {model}: projected speed-up over the exact all-reduce (cost model)", "",
             ("`jaxopt_lab/techniques/compress/cost.py`: ring all-reduce / all-gather, 5 µs a "
              "message, no overlap of communication and compute, per-worker compute fixed at the "
              f"{projection['compute_s'] * 1e3:.1f} ms measured here. Break-even: the bandwidth "
              "below which the method is faster (inf: at every bandwidth; 0: at none)."), "",
             "| method | Gb/s | " + " | ".join(f"{w} workers" for w in cost.DEFAULT_WORKERS)
             + " | break-even Gb/s at 8 / 1024 |", "|---|---|" + "---|" * (
                 len(cost.DEFAULT_WORKERS) + 1)]
    for method in methods:
        for gbps in cost.DEFAULT_BANDWIDTHS_GBPS:
            cells = [r for r in rows if r["method"] == method and r["bandwidth_gbps"] == gbps]
            ends = [r["break_even_gbps"] for r in cells if r["workers"] in (8, 1024)]
            lines.append(f"| {method} | {gbps:g} | " + " | ".join(
                f"{r['speedup']:.2f}×" for r in cells) + " | " + " / ".join(
                f"{e:.3g}" for e in ends) + " |")
    return [*lines, ""]


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entry = results.get("mnist1d_cnn128", {})
    if "methods" not in entry:
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, r in entry["methods"].items():
        axes[0].scatter(r["comm_ratio"], 100 * r["test_accuracy"]["mean"])
        axes[0].annotate(name, (r["comm_ratio"], 100 * r["test_accuracy"]["mean"]), fontsize=7)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("fewer bytes than the all-reduce (×)")
    axes[0].set_ylabel("test accuracy (%)")
    axes[0].set_title("wide MNIST-1D CNN, 4 devices, seed 0")
    if "projection" in entry:
        rows = [r for r in entry["projection"]["rows"] if r["bandwidth_gbps"] == 10]
        for method in dict.fromkeys(r["method"] for r in rows):
            mine = [r for r in rows if r["method"] == method]
            axes[1].plot([r["workers"] for r in mine], [r["speedup"] for r in mine],
                         marker="o", label=method)
        axes[1].set_xscale("log", base=2)
        axes[1].set_yscale("log")
        axes[1].set_xlabel("workers")
        axes[1].set_ylabel("projected speed-up over all-reduce")
        axes[1].set_title("cost model at 10 Gb/s, 5 µs")
        axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
