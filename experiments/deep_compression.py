"""Deep Compression, the pipeline of Han et al. 2016 (prune → quantize → encode), in this framework:
gradual magnitude pruning, then int8 or int4 AQT quantization-aware training, then the pruned
integer weights stored in a compact encoding (bitmask or relative indices plus values), then an
entropy coder from Python's standard library (lzma) over those bytes.

    .venv/bin/python experiments/deep_compression.py [--seeds 5] [--models cnn128 digits]

Every layer is pruned and quantized (`skip=()`), with ERK per-layer sparsities (the small first
conv and the logits layer keep more of their weights). Each stage is trained from scratch with
the techniques so far, as one population over seeds × sparsities, so stages are paired by seed.
A stage's bytes are `model_bytes` of what it ships: float32 kernels (dense), the encoded pruned
kernels (the smaller encoding), the encoded int8 / int4 values of the AQT serving form with its
float scales and biases, and the lzma-compressed bytes of that form. Accuracies are each
member's evaluation on the validation and test splits; the serving form's outputs equal it bit for
bit (checked on one member per stage, and a property test of the quantize suite). The headline
(the smallest form within 1 point of dense) is chosen on the validation paired difference; its
test figures are reported. A finished stage is reused and a stopped one resumes from its last
checkpoint.

Writes results/deep_compression.{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
import lzma
from pathlib import Path

import jax
import numpy as np
from common import ROOT, SPLITS, machine, paired, stats

from jaxopt_lab import choose, load_config, load_run, train_and_evaluate
from jaxopt_lab.core.measure import model_bytes
from jaxopt_lab.core.state import model_params, sample_input
from jaxopt_lab.techniques import quantize
from jaxopt_lab.techniques.prune import storage
from jaxopt_lab.workflows.convert import outputs_identical

# config, overrides, steps, sparsities (digits' 21k weights bear less pruning). Validation:
# MNIST-1D 1000 fresh generator examples (the paper's train and test untouched), digits 10 % of
# train (its config's default).
MODELS = {
    "cnn128": ("mnist1d_cnn.py", ["--config.model.channels=128",
                                  "--config.data.generated_validation=1000"], 3000, (0.9, 0.95)),
    "digits": ("digits_cnn.py", [], 2000, (0.8, 0.9)),
}
PRUNE = ["--config.techniques.prune.method=magnitude", "--config.techniques.prune.skip=()",
         "--config.techniques.prune.distribution=erk"]


def qat(bits: int) -> list[str]:
    return ["--config.techniques.quantize.method=qat", f"--config.techniques.quantize.bits={bits}",
            "--config.techniques.quantize.skip=()",
            "--config.techniques.quantize.activations=False"]


STAGES = {"dense": [], "pruned": PRUNE, "pruned_int8": PRUNE + qat(8),
          "pruned_int4": PRUNE + qat(4)}


def train_stage(model: str, stage: str, seeds: int, root, steps: int | None) -> tuple:
    """One population (seeds × sparsities; seeds only for dense); (run, member keys)."""
    config_file, overrides, default_steps, sparsities = MODELS[model]
    steps = steps or default_steps
    sparsities = (0.0,) if stage == "dense" else sparsities
    pairs = [(s, q) for q in sparsities for s in range(seeds)]
    population = (("seed", tuple(s for s, _ in pairs)),)
    if stage != "dense":
        population += (("techniques.prune.sparsity", tuple(q for _, q in pairs)),)
    workdir = root / model / stage
    if not (workdir / "summary.json").exists():
        config = load_config(str(ROOT / "configs" / config_file), [
            *overrides, *STAGES[stage], f"--config.train.steps={steps}",
            f"--config.population={population!r}", "--config.train.progress=False",
            "--config.train.measure=False"])
        summary = train_and_evaluate(config, str(workdir))
        print(f"{model} {stage}: {summary['steps_per_s']:.1f} steps/s", flush=True)
    return load_run(str(workdir)), pairs


def member(tree, i: int):
    return jax.tree.map(lambda a: np.asarray(a[i]), tree)


def packed_bytes(tree) -> bytes:
    """The arrays of `tree` as one byte string; 4-bit values two to a byte, as they are counted."""
    chunks = []
    for leaf in jax.tree.leaves(tree):
        a = np.asarray(leaf)
        if a.dtype.itemsize == 1 and a.dtype.name in ("int4", "uint4"):
            nibbles = (a.reshape(-1).astype(np.int8) & 0xF).astype(np.uint8)
            nibbles = np.pad(nibbles, (0, nibbles.size % 2))
            chunks.append((nibbles[0::2] | (nibbles[1::2] << 4)).tobytes())
        else:
            chunks.append(a.tobytes())
    return b"".join(chunks)


def smallest_encoding(params, paths=None) -> tuple[int, str, dict]:
    """(bytes, name, encoded form) of the smallest of the bitmask and 8- and 4-bit relative
    index encodings of `params`' `paths`."""
    forms = {}
    for encoding, bits in (("bitmask", 8), ("relative_index", 8), ("relative_index", 4)):
        encoded = storage.encode(params, encoding, paths, bits)
        name = encoding if encoding == "bitmask" else f"relative_index_{bits}bit"
        forms[name] = (model_bytes(encoded), encoded)
    name = min(forms, key=lambda n: forms[n][0])
    return forms[name][0], name, forms[name][1]


def shipped(run, i: int, stage: str, sample_x) -> dict:
    """The bytes of member i's deployable form at `stage`, and its encoding."""
    params = model_params(member(run.state.params, i))
    if stage == "dense":
        return {"model_bytes": model_bytes(params)}
    if stage == "pruned":
        size, encoding, _ = smallest_encoding(params)
        return {"model_bytes": size, "encoding": encoding}
    model = run.experiment.model
    variables = {"params": params, **member(run.state.model_state, i)}
    serving = quantize.convert(model, variables, sample_x)
    flat = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(serving)}
    integer = [p for p, x in flat.items() if "int" in str(x.dtype) and np.ndim(x) >= 2]
    size, encoding, encoded = smallest_encoding(serving, integer)
    return {"model_bytes": size, "encoding": encoding,
            "lzma_bytes": len(lzma.compress(packed_bytes(encoded), preset=9 | lzma.PRESET_EXTREME)),
            "dense_serving_bytes": model_bytes(serving)}


def run_model(model: str, seeds: int, root, steps: int | None) -> dict:
    stages, train_s = {}, 0.0
    dense_bytes = None
    for stage in STAGES:
        run, pairs = train_stage(model, stage, seeds, root, steps)
        summary = _summary(root / model / stage)
        summary_members, train_s = summary["members"], train_s + summary["train_wall_s"]
        sample_x = sample_input(run.dataset)
        rows = []
        for i, (seed, sparsity) in enumerate(pairs):
            row = {"seed": seed, "sparsity": sparsity,
                   "test_accuracy": summary_members[i]["test_accuracy"],
                   "validation_accuracy": summary_members[i]["validation_accuracy"],
                   **shipped(run, i, stage, sample_x)}
            rows.append(row)
        if stage.startswith("pruned_int"):  # what is served is what was evaluated
            model_ = run.experiment.model
            variables = {"params": model_params(member(run.state.params, 0)),
                         **member(run.state.model_state, 0)}
            serving = quantize.convert(model_, variables, sample_x)
            identical = outputs_identical(model_, variables, serving,
                                          jax.jit(quantize.serve_fn(model_)), run.dataset.test,
                                          1000)
            for row in rows:
                row["serving_bit_identical_member0"] = identical
        stages[stage] = rows
        if stage == "dense":
            dense_bytes = rows[0]["model_bytes"]
    return {"dense_bytes": dense_bytes, "stages": stages, "train_minutes": train_s / 60}


def _summary(workdir) -> dict:
    return json.loads((workdir / "summary.json").read_text())


# What each stage is measured against in "bought": the stage it adds one step to.
PREVIOUS = {"pruned": "dense", "pruned_int8": "pruned", "pruned_int8 + lzma": "pruned_int8",
            "pruned_int4": "pruned", "pruned_int4 + lzma": "pruned_int4"}


def table(result: dict) -> list[dict]:
    """Rows per (stage, sparsity): accuracy and paired Δ vs dense on each split, bytes, ratio vs
    fp32, and what the stage bought over the one before it (size factor, test accuracy change)."""
    dense = {split: {r["seed"]: r[f"{split}_accuracy"] for r in result["stages"]["dense"]}
             for split in SPLITS}
    rows = []
    for stage, members in result["stages"].items():
        for sparsity in sorted({m["sparsity"] for m in members}):
            chosen = [m for m in members if m["sparsity"] == sparsity]
            for column in ("model_bytes", "lzma_bytes"):
                if column not in chosen[0]:
                    continue
                sizes = [m[column] for m in chosen]
                row = {"stage": stage + (" + lzma" if column == "lzma_bytes" else ""),
                       "sparsity": sparsity, "encoding": chosen[0].get("encoding", "dense"),
                       "model_bytes": float(np.mean(sizes)),
                       "size_ratio": result["dense_bytes"] / float(np.mean(sizes))}
                for split in SPLITS:
                    key = f"{split}_accuracy"
                    row[key] = stats([m[key] for m in chosen])
                    row[f"{split}_paired_difference"] = paired(
                        [m[key] for m in chosen], [dense[split][m["seed"]] for m in chosen])
                rows.append(row)
    for row in rows:
        previous = next((r for r in rows if r["stage"] == PREVIOUS.get(row["stage"])
                         and r["sparsity"] in (row["sparsity"], 0.0)), None)
        if previous is not None:
            row["bought"] = {"size_factor": previous["model_bytes"] / row["model_bytes"],
                             "test_accuracy_points": 100 * (row["test_accuracy"]["mean"]
                                                            - previous["test_accuracy"]["mean"]),
                             "over": previous["stage"]}
    return rows


def headline(rows: list[dict]) -> dict:
    """The smallest form whose mean paired validation drop is within 1 point of dense; its test
    figures under the keys other tools read (`paired_difference` is the test one), the
    validation figures beside them."""
    dense = next(r for r in rows if r["stage"] == "dense")
    best = choose(rows, "validation_paired_difference", at_least=-0.01, prefer="size_ratio")
    return {"dense_test_accuracy": dense["test_accuracy"]["mean"],
            "compressed_test_accuracy": best["test_accuracy"]["mean"],
            "size_ratio": best["size_ratio"], "stage": best["stage"],
            "sparsity": best["sparsity"], "encoding": best["encoding"],
            "paired_difference": best["test_paired_difference"],
            "dense_validation_accuracy": dense["validation_accuracy"]["mean"],
            "compressed_validation_accuracy": best["validation_accuracy"]["mean"],
            "validation_paired_difference": best["validation_paired_difference"]}


def write(results: dict, seeds: int) -> None:
    out = ROOT / "results" / "deep_compression"
    (out.with_suffix(".json")).write_text(json.dumps(results, indent=2) + "\n")
    lines = ["# Deep Compression: prune → int8 / int4 QAT → compact encoding → lzma", "",
             (f"Written by `experiments/deep_compression.py` on {machine()}; training took "
              + ", ".join(f"{r['train_minutes']:.0f} min ({m})"
                          for m, r in results["models"].items()) + ". "
             f"{seeds} seeds per stage, paired with the dense run of the same seed (Δ, points; "
             "validation: MNIST-1D 1000 fresh generator examples, digits 10 % of train). "
             "Every layer pruned (gradual magnitude, ERK per-layer sparsities) and quantized "
             "(per-channel, weights; float32 scales and biases). Size ratio: fp32 dense bytes / "
             "the stage's bytes (`model_bytes` of what it ships; lzma: the compressed length of "
             "those bytes)."), ""]
    for model, result in results["models"].items():
        lines += [f"## {model}", "", ("| stage | sparsity | encoding | Δ validation vs dense "
                                      "| test accuracy | Δ test vs dense | bytes "
                                      "| × smaller than fp32 | bought over the stage before |"),
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in result["table"]:
            lines.append(f"| {r['stage']} | {r['sparsity']:g} | {r['encoding']} "
                         f"| {_delta(r['validation_paired_difference'])} "
                         f"| {r['test_accuracy']['mean']:.4f} ± {r['test_accuracy']['std']:.4f} "
                         f"| {_delta(r['test_paired_difference'])} | {r['model_bytes']:.0f} "
                         f"| {r['size_ratio']:.1f}× | {_bought(r)} |")
        h = result["headline"]
        lines += ["", (f"Smallest within 1 point of dense on validation (mean paired Δ "
                       f"{100 * h['validation_paired_difference']['mean']:+.2f}): **{h['stage']} "
                       f"at {h['sparsity']:g} sparsity, {h['size_ratio']:.1f}× smaller**, test "
                       f"accuracy {h['compressed_test_accuracy']:.4f} vs dense "
                       f"{h['dense_test_accuracy']:.4f} "
                       f"({100 * h['paired_difference']['mean']:+.2f} points)."), ""]
    (out.with_suffix(".md")).write_text("\n".join(lines))
    plot(results, out.with_suffix(".png"))


def _delta(d: dict) -> str:
    return f"{100 * d['mean']:+.2f} ± {100 * d['std']:.2f}"


def _bought(row: dict) -> str:
    if "bought" not in row:
        return "—"
    b = row["bought"]
    return (f"{b['size_factor']:.2f}× smaller, {b['test_accuracy_points']:+.2f} test points vs "
            f"{b['over']}")


def plot(results: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results["models"]), figsize=(6 * len(results["models"]), 4),
                             squeeze=False)
    for ax, (model, result) in zip(axes[0], results["models"].items(), strict=True):
        chains = {"int8": ("dense", "pruned", "pruned_int8", "pruned_int8 + lzma"),
                  "int4": ("pruned", "pruned_int4", "pruned_int4 + lzma")}
        for color, sparsity in zip(("tab:blue", "tab:orange"), MODELS[model][3], strict=False):
            for chain, stages in chains.items():
                rows = [next(r for r in result["table"] if r["stage"] == stage
                             and r["sparsity"] in (0.0, sparsity)) for stage in stages]
                ax.errorbar([r["size_ratio"] for r in rows],
                            [100 * r["test_paired_difference"]["mean"] for r in rows],
                            yerr=[100 * r["test_paired_difference"]["std"] for r in rows],
                            marker="o",
                            color=color, linestyle="-" if chain == "int8" else "--",
                            capsize=2, label=f"sparsity {sparsity:g}, {chain}")
                for r in rows[1:]:
                    ax.annotate(r["stage"].removeprefix("pruned_"),
                                (r["size_ratio"], 100 * r["test_paired_difference"]["mean"]),
                                fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.axhline(-1, color="red", linestyle="--", linewidth=0.8, label="1 point")
        ax.axvline(20, color="gray", linestyle=":", linewidth=0.8, label="20×")
        ax.set_xscale("log")
        ax.set_xlabel("× smaller than fp32")
        ax.set_ylabel("Δ test accuracy vs dense (points)")
        ax.set_title(model)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--steps", type=int, default=None, help="default: each model's own")
    parser.add_argument("--workroot", default=str(ROOT / "runs" / "deep_compression"))
    args = parser.parse_args()
    root = Path(args.workroot)
    results = {"models": {}}
    for model in args.models:
        result = run_model(model, args.seeds, root, args.steps)
        result["table"] = table(result)
        result["headline"] = headline(result["table"])
        results["models"][model] = result
    main_model = results["models"].get("cnn128") or next(iter(results["models"].values()))
    results.update(main_model["headline"])  # the wide CNN's figures at the top level
    write(results, args.seeds)


if __name__ == "__main__":
    main()
