"""benchmarks/vectorized_sweep.py: a tiny CPU run writes its JSON and section with positive rates;
the population it times holds the same trials its sequential side runs (member i after N steps
equals trial i run alone); bad arguments get one line and exit 2.

tests/test_population.py checks populations made by the loop (core's population_init); this
benchmark makes its members with one vmapped init, so its equality is checked here.
"""

from __future__ import annotations

import importlib
import json
import math
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "vectorized_sweep.py"


def _module():
    if str(SCRIPT.parent) not in sys.path:  # as when run as a script: its sibling modules import
        sys.path.insert(0, str(SCRIPT.parent))
    return importlib.import_module("vectorized_sweep")


def _positive(value) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


@pytest.mark.slow
def test_tiny_run_writes_rates_for_every_size_and_its_section(tmp_path):
    results, out_json = tmp_path / "RESULTS.md", tmp_path / "sweep.json"
    results.write_text("# Benchmark results\n\nkept\n")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--sizes", "1,2", "--models", "mlp",
         "--steps-per-call", "2", "--repeats", "2", "--min-repeat-s", "0.01",
         "--sequential-trials", "1", "--results", str(results), "--json", str(out_json)],
        check=False, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out_json.read_text())
    assert report["device"] == {"device_kind": "cpu", "backend": "cpu"}
    assert report["machine"].startswith("this CPU:") and report["steps_per_call"] == 2
    rows = report["rows"]
    assert [(r["model"], r["population"]) for r in rows] == [("mlp", 1), ("mlp", 2)]
    for row in rows:
        assert row["error"] is None, row
        for key in ("vectorized_trial_steps_per_s", "sequential_trial_steps_per_s", "ratio",
                    "ratio_low", "ratio_high", "compile_s", "sequential_compile_s"):
            assert _positive(row[key]), (key, row)
        assert row["ratio_low"] <= row["ratio"] <= row["ratio_high"]
        assert len(row["vectorized_seconds_per_call"]) == 2
    # One compiled single-trial program, timed next to each population.
    assert rows[0]["sequential_compile_s"] == rows[1]["sequential_compile_s"]
    assert len(rows[1]["sequential_seconds_per_call"]) == 2
    text = results.read_text()
    assert text.startswith("# Benchmark results\n\nkept\n")
    assert text.count("<!-- vectorized_sweep-cpu:begin -->") == 1
    assert "| mlp | 2 |" in text and "the first 1 of the same trials" in text


def test_a_population_member_after_n_steps_equals_its_trial_run_alone():
    vs = _module()
    from jaxopt_lab.core.population import population_step

    s = vs.setup("mlp")
    values = vs.sweep_values(2)
    assert values[0]["optim.lr"] != values[1]["optim.lr"]
    calls = 3  # of K=2 steps: 6 steps each
    population_call, population = vs.k_step_calls(
        population_step(s.step_fn), [vs.population_state(s, values)], s.source, 2, s.mesh)
    trials_call, trials = vs.k_step_calls(
        s.step_fn, [vs.trial_state(s, v) for v in values], s.source, 2, s.mesh)
    for _ in range(calls):
        population_call()
        for _ in values:  # one trial per call, in turn
            trials_call()
    members = population()[0].members
    for i, trial in enumerate(trials()):
        assert int(trial.step) == int(members.step[i]) == 6
        jax.tree.map(lambda a, b, i=i: np.testing.assert_allclose(a[i], b, rtol=2e-4, atol=1e-6),
                     members, trial)
    first, second = (jax.tree.leaves(p) for p in trials())
    assert any(not np.allclose(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("argv, message", [
    (["--sizes", "1,x"], "--sizes='1,x': expected positive integers"),
    (["--sizes", "0,4"], "at least 1"),
    (["--models", "mlp,resnet99"], "--models: 'resnet99' is not a registry model"),
    (["--repeats", "0"], "--repeats=0: must be at least 1"),
])
def test_bad_arguments_get_one_line_and_exit_2(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        _module().main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_models_past_the_budget_are_recorded_as_skipped(tmp_path):
    out_json, results = tmp_path / "sweep.json", tmp_path / "RESULTS.md"
    _module().main(["--budget-s", "0", "--json", str(out_json), "--results", str(results)])
    rows = json.loads(out_json.read_text())["rows"]
    assert rows == [{"model": m, "skipped": "skipped: out of the 0 s budget"}
                    for m in ("mlp", "cnn1d")]
    assert "| cnn1d |  | skipped: out of the 0 s budget |" in results.read_text()
