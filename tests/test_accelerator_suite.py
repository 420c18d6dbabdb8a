"""benchmarks/accelerator_suite.py on CPU with tiny shapes: every part runs or says why not, the
ratios are positive finite numbers, one part failing keeps the others, and the JSON and the
RESULTS.md section land where told (never the repository's files from a tiny run)."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "accelerator_suite.py"
PARTS = ("peak", "resnet", "overhead", "population", "vit", "quantize")


def _module():
    if str(SCRIPT.parent) not in sys.path:  # as when run as a script: its sibling modules import
        sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("accelerator_suite", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(tmp_path, *extra, timeout=900):
    results, out_json = tmp_path / "RESULTS.md", tmp_path / "suite.json"
    results.write_text("# Benchmark results\n\nkept\n")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--write", "--results", str(results),
         "--json", str(out_json), *extra],
        check=False, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out_json.read_text()), results.read_text(), proc.stdout


def _positive(value) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


def _check_ratio(ratio):
    assert ratio is not None
    assert all(_positive(ratio[k]) for k in ("median", "low", "high")), ratio
    assert ratio["low"] <= ratio["median"] <= ratio["high"]


@pytest.mark.slow
def test_tiny_suite_measures_the_step_loop_and_population_parts(tmp_path):
    # The ViT part runs the ResNet part's code on another model: left out here to keep the suite
    # within its time; quantize_gpu.py --tiny has its own test.
    report, text, stdout = _run(tmp_path, "--parts", "peak", "resnet", "overhead", "population")
    assert tuple(report["parts"]) == PARTS
    assert report["parts"]["vit"] == {"skipped": "not asked for"}
    assert report["tiny"] and report["machine"]["platform"] == "cpu"
    parts = report["parts"]

    assert parts["peak"]["error"] is None and _positive(parts["peak"]["tflops"])

    for row in (parts["resnet"],):
        assert row["error"] is None, row
        assert row["flops_per_step"] > 0, row
        for name, variant in row["variants"].items():
            assert "error" not in variant, (name, variant)
            assert len(variant["seconds"]) == report["repeats"]
            assert all(_positive(v) for v in (variant["median_ms"], variant["examples_per_s"],
                                              variant["tflops"], variant["pct_of_peak"]))
        for ratio in row["ratios"].values():
            _check_ratio(ratio)

    population = parts["population"]
    assert population["error"] is None and population["trials"] == 4
    _check_ratio(population["ratios"]["population / one trial, trials·steps/s"])
    assert all(_positive(v["trial_steps_per_s"]) for v in population["variants"].values())

    overhead = parts["overhead"]
    assert overhead["error"] is None and overhead["rows"], overhead
    assert overhead["section"], "overhead.py's table is embedded in the suite's section"
    for row in overhead["rows"]["rows"]:  # overhead.py's JSON, as it wrote it
        assert all(_positive(row[f"ratio_{label}"]) for label in ("k1", "auto", "k50")), row

    assert parts["quantize"] == {"skipped": "not asked for (--quantize runs it)"}

    # One section, rewritten after every part (not appended), naming the device.
    assert text.startswith("# Benchmark results\n\nkept\n")
    assert text.count("<!-- accelerator-cpu:begin -->") == 1
    assert "## Accelerator suite on cpu (tiny smoke shapes)" in text
    assert "| resnet | 8 | framework float32 |" in stdout  # rows printed as they finish


def test_a_failing_part_is_recorded_and_the_run_goes_on(tmp_path):
    report, text, _ = _run(tmp_path, "--parts", "overhead", "--overhead-args=--no-such-flag",
                           timeout=300)
    overhead = report["parts"]["overhead"]
    assert overhead["returncode"] == 2 and "--no-such-flag" in overhead["error"]
    assert {name: p.get("skipped") for name, p in report["parts"].items() if name != "overhead"
            } == {"peak": "not asked for", "resnet": "not asked for",
                  "population": "not asked for", "vit": "not asked for",
                  "quantize": "not asked for (--quantize runs it)"}
    assert "Failed: exit 2" in text


def test_out_of_budget_parts_are_skipped_not_lost(tmp_path):
    report, text, _ = _run(tmp_path, "--budget-s", "0", timeout=300)
    assert all("budget" in report["parts"][name]["skipped"] for name in PARTS[:5])
    assert text.count("Skipped: out of the 0 s budget.") == 5


@pytest.mark.parametrize("where", ["--results", "--json"])
def test_tiny_refuses_to_write_the_repository_files(tmp_path, where):
    module = _module()
    paths = {"--results": str(tmp_path / "R.md"), "--json": str(tmp_path / "s.json")}
    paths[where] = str(ROOT / "benchmarks" / ("RESULTS.md" if where == "--results"
                                              else "accelerator_suite.json"))
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--tiny", "--write", "--results", paths["--results"],
                     "--json", paths["--json"]])
    assert exit_info.value.code == 2
