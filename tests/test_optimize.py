"""`jaxopt-lab optimize`: a tiny digits pipeline whose report agrees with its run directories and
resumes without training again; the Pareto set and the best pick; bad input gets one line."""

from __future__ import annotations

import json

import pytest
from helpers import run_cli

from jaxopt_lab import load_config, load_run
from jaxopt_lab.errors import UserError
from jaxopt_lab.export.runtimes import load_onnx
from jaxopt_lab.optimize import optimize, pipeline
from jaxopt_lab.optimize.candidates import recipes
from jaxopt_lab.profile.pareto import best_candidate, pareto_flags

TINY = ["--config.train.steps=40", "--config.train.eval_every=40", "--config.train.log_every=20",
        "--config.train.checkpoint_every=40", "--config.train.steps_per_call=1",
        "--config.optim.warmup_steps=5", "--config.train.progress=False",
        "--config.optimize.candidates=('structured_int8',)",
        "--config.optimize.structured_sparsities=(0.5,)"]
FIELDS = ("name", "techniques", "validation_accuracy", "test_accuracy", "model_bytes",
          "latency_ms_batch1", "latency_ms_batch256", "flops", "run_dir", "pareto")


@pytest.mark.slow
def test_report_matches_each_candidates_own_summary_and_a_rerun_trains_nothing(
        tmp_path, monkeypatch):
    report = optimize("configs/digits_cnn.py", str(tmp_path), tuple(TINY), progress=False)
    for name in ("report.md", "report.json", "pareto.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert json.loads((tmp_path / "report.json").read_text()) == report
    names = [c["name"] for c in report["candidates"]]
    assert names == ["structured_int8_50"]
    for candidate in report["candidates"]:
        assert set(FIELDS) <= set(candidate), candidate["name"]
        source = candidate["source"]
        with open(source["summary"]) as f:
            recorded = json.load(f)
        if source["member"] is not None:
            recorded = recorded["members"][source["member"]]
        for key in ("validation_accuracy", "test_accuracy"):
            assert candidate[key] == recorded[key], (candidate["name"], key)
        assert candidate["model_bytes"] == recorded[source["model_bytes_key"]]
        assert candidate["model_bytes"] < report["baseline"]["model_bytes"]
        # every round's latency kept, and the speed-up's range taken within rounds
        baseline_rounds = report["baseline"]["latency_ms_batch256_rounds"]
        rounds = candidate["latency_ms_batch256_rounds"]
        assert len(rounds) == len(baseline_rounds) > 1
        assert min(rounds) == candidate["latency_ms_batch256"]
        ratios = [b / c for b, c in zip(baseline_rounds, rounds, strict=True)]
        assert candidate["speedup_batch256_range"] == [min(ratios), max(ratios)]

    # The structured int8 candidate is the shrunk model's int8 serving form: half of Conv_1's
    # 64 filters (the default skip keeps the first conv and the logits whole), served as trained.
    shrunk = report["candidates"][0]
    config = json.loads((tmp_path / "structured_int8" / "shrunk_50" / "config.json").read_text())
    assert config["model"]["features"] == [32, 32]
    served = json.loads((tmp_path / "structured_int8" / "shrunk_50" / "quantized"
                         / "summary.json").read_text())
    assert served["serving_bit_identical"] and served["scheme"] == "w8"
    assert shrunk["flops"] < report["baseline"]["flops"]
    # Sparsities of one recipe as one population, each member a candidate: optimize.ipynb's test.
    assert report["best"] in (*names, None)

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    def no_conversion(*args, **kwargs):
        raise AssertionError("a finished shrink or conversion was done again")

    monkeypatch.setattr(pipeline, "train_and_evaluate", no_training)
    monkeypatch.setattr(pipeline, "shrink_run", no_conversion)
    monkeypatch.setattr(pipeline, "quantize_run", no_conversion)
    monkeypatch.setattr(pipeline, "profile_config", no_conversion)
    # Timing again is what a rerun does; here it costs compiles and says nothing new.
    monkeypatch.setattr(pipeline, "_forms", lambda *args, **kwargs: ({}, None))
    monkeypatch.setattr(pipeline, "compare_latency", lambda forms, sample, progress: {
        row["name"]: {k: v for k, v in row.items() if k.startswith("latency_ms_batch")}
        for row in (report["baseline"], *report["candidates"])})
    again = optimize("configs/digits_cnn.py", str(tmp_path), tuple(TINY), progress=False)
    assert again == report


@pytest.mark.slow
@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_in_onnx_runtime_accuracy_and_latency_are_the_runtimes(tmp_path, runtime):
    """optimize.runtime=onnxruntime|openvino: the int8 candidate trains w8a8 with static scales,
    is exported, and the report's accuracies are the runtime's outputs on the splits."""
    report = optimize("configs/digits_cnn.py", str(tmp_path),
                      (*TINY, f"--config.optimize.runtime={runtime}"), progress=False)
    assert report["runtime"]["name"] == runtime
    assert report["runtime"]["version"].startswith(f"{runtime} 20" if runtime == "openvino"
                                                   else f"{runtime} 1.")
    assert f"served by **{runtime} " in (tmp_path / "report.md").read_text()
    candidate, = report["candidates"]
    served = json.loads((tmp_path / "structured_int8" / "shrunk_50" / "quantized"
                         / "summary.json").read_text())
    assert served["scheme"] == "w8a8" and served["options"]["static_activations"]
    assert served["calibration_batches"] == 10
    run = load_run(str(tmp_path / "baseline"))
    predict = load_onnx(str(tmp_path / "deploy" / runtime / "structured_int8_50.onnx"), runtime)
    for split in ("validation", "test"):
        arrays = getattr(run.dataset, split)
        accuracy = float((predict(arrays["x"]).argmax(-1) == arrays["label"]).mean())
        assert candidate[f"{split}_accuracy"] == accuracy
        assert candidate[f"{split}_agreement"] >= 0.98
    # Both baselines timed in the same rounds; speed-ups against XLA float32's.
    runtime_base = report["runtime_baseline"]
    assert runtime_base["name"] == f"baseline ({runtime} float32)"
    base_rounds = report["baseline"]["latency_ms_batch256_rounds"]
    ratios = [b / c for b, c in zip(base_rounds, candidate["latency_ms_batch256_rounds"],
                                    strict=True)]
    assert candidate["speedup_batch256_range"] == [min(ratios), max(ratios)]
    with pytest.raises(UserError, match=f"was made for optimize.runtime={runtime}"):
        optimize("configs/digits_cnn.py", str(tmp_path), tuple(TINY), progress=False)


def _row(name, accuracy, latency, size):
    return {"name": name, "validation_accuracy": accuracy, "latency_ms_batch256": latency,
            "model_bytes": size, "size_ratio": 100 / size, "speedup_batch256": 2.0 / latency}


def test_pareto_set_and_best_under_the_accuracy_constraint():
    rows = [_row("fast", 0.96, 1.0, 50), _row("dominated", 0.955, 1.5, 60),
            _row("accurate", 0.99, 2.0, 100), _row("tiny", 0.90, 1.8, 5)]
    assert pareto_flags(rows) == [True, False, True, True]
    baseline = {"validation_accuracy": 0.97}
    assert best_candidate(baseline, rows, 1.0, "size_latency") == "fast"  # tiny: 7 points lost
    assert best_candidate(baseline, rows, 10.0, "size") == "tiny"
    assert best_candidate(baseline, rows, 1.0, "latency") == "fast"
    assert best_candidate(baseline, rows[3:], 1.0, "size_latency") is None


def test_a_recipes_sparsities_are_one_population_and_it_retrains_by_hand(tmp_path):
    recipes_asked = ("--config.optimize.candidates=('unstructured', 'structured_int8', "
                     "'distill_structured')")
    config = load_config("configs/digits_cnn.py", (recipes_asked,))
    unstructured, structured_int8, distill_structured = recipes(config, str(tmp_path))
    # The pruned half-width student, served in float: the student's overrides, then pruning's.
    assert distill_structured.shrink and not distill_structured.quantize
    assert distill_structured.overrides[:2] == (
        "--config.model.features=(16, 32)", f"--config.techniques.distill.teacher={tmp_path}")
    assert distill_structured.overrides[2:] == structured_int8.overrides[:3]
    assert unstructured.sparsities == (0.8, 0.9, 0.95)
    assert structured_int8.sparsities == (0.5, 0.75)
    assert structured_int8.shrink and structured_int8.quantize and not unstructured.shrink
    # The overrides are what `jaxopt-lab train` takes: they build the population the user reruns.
    retrained = load_config("configs/digits_cnn.py", unstructured.overrides)
    assert retrained.techniques.prune.pattern == "unstructured"
    assert [tuple(values) for _, values in retrained.population] == [(0.8, 0.9, 0.95)]


def test_bad_optimize_block_is_one_line_before_any_training(tmp_path):
    with pytest.raises(UserError, match="optimize.structured_sparsities"):
        optimize("configs/digits_cnn.py", str(tmp_path),
                 ("--config.optimize.structured_sparsities=(1.5,)",), progress=False)
    with pytest.raises(UserError, match="validation_fraction"):
        optimize("configs/mnist1d_cnn.py", str(tmp_path), progress=False)
    with pytest.raises(UserError, match="--baseline .*no summary.json"):
        optimize("configs/digits_cnn.py", str(tmp_path), baseline=str(tmp_path), progress=False)
    with pytest.raises(UserError, match="optimize.runtime='tensorrt' is unknown"):
        optimize("configs/digits_cnn.py", str(tmp_path / "r"),
                 ("--config.optimize.runtime=tensorrt",), progress=False)
    result = run_cli("optimize", "--config", "configs/digits_cnn.py", "--workdir",
                     str(tmp_path / "d"), "--config.optimize.candidates=('prune_it',)")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert "optimize.candidates" in result.stderr and "'prune_it'" in result.stderr
    assert not (tmp_path / "d" / "baseline").exists()
