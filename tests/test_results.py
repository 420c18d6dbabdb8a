"""Every committed summary re-derived from the per-seed data in its results file, by the code that
wrote it (no training): a hand edit, a stale summary or a summary whose derivation changed without
a rerun fails here."""

import json
import pathlib
import statistics
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results"
sys.path.insert(0, str(ROOT / "experiments"))

import compress_accuracy
import deep_compression
import distill_mnist1d
import hpo_efficiency
import prune_accuracy
import prune_structured
import quantize_accuracy


def _load(name: str):
    return json.loads((RESULTS / name).read_text())


def _seed_summaries(node, path=""):
    """Every {"mean", "std", "per_seed"} in a results file, with where it is."""
    if isinstance(node, dict):
        if "per_seed" in node and "mean" in node:
            yield path, node
        for key, value in node.items():
            yield from _seed_summaries(value, f"{path}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _seed_summaries(value, f"{path}[{i}]")


@pytest.mark.parametrize("path", sorted(RESULTS.glob("**/*.json")), ids=lambda p: p.name)
def test_every_mean_and_std_is_that_of_its_per_seed_values(path):
    for where, s in _seed_summaries(json.loads(path.read_text())):
        values = s["per_seed"]
        assert s["mean"] == pytest.approx(statistics.mean(values), abs=1e-12), where
        if "std" in s and len(values) > 1:
            assert s["std"] == pytest.approx(statistics.stdev(values), abs=1e-12), where


def test_the_seed_summaries_are_found():
    assert sum(1 for _ in _seed_summaries(_load("prune_accuracy.json"))) > 20


def test_prune_summary_is_rederived():
    fields = {**prune_accuracy.summary_fields(_load("prune_accuracy.json")["models"]),
              **prune_structured.summary_fields(_load("prune_structured.json"))}
    assert _load("prune_summary.json") == fields


def test_compress_summary_is_rederived():
    results = _load("compress_accuracy.json")
    assert _load("compress_summary.json") == {
        "machine": results["machine"], **compress_accuracy.summary_fields(results["models"])}


def test_quantize_summary_is_rederived():
    fields = quantize_accuracy.summary_fields(_load("quantize_accuracy.json")["models"])
    assert _load("quantize_summary.json") == fields


def test_deep_compression_table_and_headline_are_rederived():
    results = _load("deep_compression.json")
    for model, result in results["models"].items():
        table = deep_compression.table(result)
        assert result["table"] == table, model
        assert result["headline"] == deep_compression.headline(table), model
    main = results["models"]["cnn128"]["headline"]
    assert {k: results[k] for k in main} == main


def test_distillation_figures_are_rederived():
    results = _load("distill_mnist1d.json")
    figures = distill_mnist1d.figures(results["runs"])
    assert {k: results[k] for k in figures} == figures
    assert results["paired_differences"] == distill_mnist1d.comparisons(results["runs"])


HPO_RESULTS = [path.name for path in sorted(RESULTS.glob("hpo_efficiency*.json"))]


@pytest.mark.parametrize("name", HPO_RESULTS)
def test_hpo_headline_is_rederived(name):
    results = _load(name)
    methods, trials = results["methods"], results["trials"]
    targets = [curve[-1] for curve in methods[hpo_efficiency.BASELINE]["best_so_far"]]
    assert results["random_best_of_30_median"] == statistics.median(targets)

    def counts(method):
        return [hpo_efficiency.trials_to_reach(curve, target) for curve, target
                in zip(methods[method]["best_so_far"], targets, strict=True)]

    # The first study reported the GP; later ones the better of TPE and the GP.
    bayes = results.get("best_bayes", "skopt_gp")
    if "best_bayes" in results:
        medians = {m: hpo_efficiency.median_count(counts(m), trials) or trials + 1
                   for m in hpo_efficiency.BAYES}
        assert medians[bayes] == min(medians.values())
    assert results["bayes_trials_to_match"] == counts(bayes)
    assert results["bayes_trials_to_match_median"] == hpo_efficiency.median_count(
        counts(bayes), trials)


@pytest.mark.parametrize("name", ["mnist1d_table.json", "mnist1d_table_reshuffled.json"])
def test_the_mnist1d_table_means_are_rederived(name):
    results = _load(name)
    for model, detail in results["detail"].items():
        assert results[model] == statistics.mean(detail["ours_per_seed"]), model
        assert detail["ours_mean"] == results[model]
