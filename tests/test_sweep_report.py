"""The sweep report on real in-memory Optuna studies built trial by trial (the sweep's conventions:
objectives in study.user_attrs, measured metrics and run directories in trial user_attrs)."""

from __future__ import annotations

import json

import matplotlib.image
import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

from jaxopt_lab.tune import report

DISTS = {"optim.lr": FloatDistribution(1e-4, 1e-1, log=True),
         "optim.schedule": CategoricalDistribution(["constant", "cosine"]),
         "model.kernel.size": CategoricalDistribution([3, 5]),
         "data.kernel.size": CategoricalDistribution([3, 5])}
# number: (lr, schedule, val_acc, latency); trial 1 is dominated by 0 (worse and slower).
MEASURED = [(3e-3, "cosine", 0.90, 2.0), (1e-2, "constant", 0.85, 3.0),
            (1e-3, "cosine", 0.80, 0.5), (3e-2, "constant", 0.95, 5.0)]


def _trial(lr, schedule, acc, lat, values, state=TrialState.COMPLETE, **extra):
    attrs = {"validation_accuracy": acc, "test_accuracy": acc - 0.01, "latency_ms_batch1": lat,
             "latency_ms_batch256": 40 * lat, "num_params": 1000, "model_bytes": 4000,
             "run_dir": f"/runs/a/very/long/workdir/path/trials/trial_{int(lat * 10):04d}", **extra}
    params = {"optim.lr": lr, "optim.schedule": schedule, "model.kernel.size": 3,
              "data.kernel.size": 5}
    return create_trial(state=state, values=values, params=params, distributions=DISTS,
                        user_attrs=attrs, intermediate_values={100: acc - 0.1, 200: acc})


def _study(objectives, extra=True):
    study = optuna.create_study(directions=[d for _, d in objectives])
    study.set_user_attr("objectives", [list(o) for o in objectives])
    for lr, sched, acc, lat in MEASURED:
        values = [{"validation_accuracy": acc, "latency_ms_batch1": lat}[m] for m, _ in objectives]
        study.add_trial(_trial(lr, sched, acc, lat, values))
    if extra:  # a pruned trial (no values) and an over-budget one the report must ignore
        study.add_trial(_trial(1e-4, "cosine", 0.5, 1.0, None, TrialState.PRUNED))
        study.add_trial(_trial(5e-2, "cosine", 0.99, 0.1, None, TrialState.FAIL, over_budget=True))
    return study


SINGLE = [("validation_accuracy", "maximize")]
TWO = [("validation_accuracy", "maximize"), ("latency_ms_batch1", "minimize")]


@pytest.fixture(autouse=True)
def _quiet():
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def test_top_trials_order_and_content():
    rows = report.top_trials(_study(SINGLE), k=10)
    assert [r["number"] for r in rows] == [3, 0, 1, 2, 4]  # best first, the pruned one after
    assert [r["state"] for r in rows] == ["COMPLETE"] * 4 + ["PRUNED"]
    assert rows[0]["objectives"] == {"validation_accuracy": 0.95}
    assert rows[0]["params"]["optim.lr"] == 3e-2
    assert rows[0]["metrics"]["test_accuracy"] == pytest.approx(0.94)
    assert "validation_accuracy" not in rows[0]["metrics"]  # an objective column already
    assert rows[0]["where"].endswith("trial_0050")
    assert [r["number"] for r in report.top_trials(_study(SINGLE), k=2)] == [3, 0]


def test_minimize_first_objective_sorts_ascending():
    study = _study([("latency_ms_batch1", "minimize")], extra=False)
    assert [r["number"] for r in report.top_trials(study)] == [2, 0, 1, 3]


def test_table_shortens_headers_rounds_to_4_digits_and_wraps_params_past_100_columns():
    study = _study(SINGLE)
    study.add_trial(_trial(1.23456e-3, "cosine", 0.912345, 0.7, [0.912345], resumed=True))
    table = report.format_table(report.top_trials(study))
    lines = table.splitlines()
    assert max(map(len, lines)) <= 100
    assert lines[0].split() == ["#", "state", "val_acc", "test_acc", "lat_ms_b1", "bytes", "where"]
    assert "0.9123" in table and "0.912345" not in table
    assert "6r" in table and "resumed" in table  # trial 6 was resumed after a crash
    assert "…" in table  # the long run_dir kept its tail
    assert table.index("\n3 ") < table.index("\n6r ") < table.index("\n0 ")
    # the pruned trial last, with what it measured when stopped
    assert lines[6].split()[:4] == ["4", "pruned", "0.5", "0.49"]
    # params did not fit: key=value lines, keys shortened, kernel.size keys still told apart
    assert "  #6: lr=0.001235  schedule=cosine  model.kernel.size=3  data.kernel.size=5" in lines


def test_params_as_columns_when_they_fit():
    dists = {"optim.lr": DISTS["optim.lr"], "optim.schedule": DISTS["optim.schedule"]}
    study = optuna.create_study(direction="minimize")
    for i, v in enumerate((0.25, 0.125)):  # a vectorized population's two members
        study.add_trial(create_trial(value=v, params={"optim.lr": 0.01 * (i + 1),
                                                      "optim.schedule": "cosine"},
                                     distributions=dists,
                                     user_attrs={"population_dir": "pop3", "population_index": i}))
    lines = report.format_table(report.top_trials(study)).splitlines()
    assert lines[0].split() == ["#", "state", "value", "lr", "schedule", "where"]
    assert lines[1].split() == ["1", "complete", "0.125", "0.02", "cosine", "pop3[1]"]
    assert len(lines) == 3


def test_wide_params_wrap_below_the_table():
    many = {f"techniques.distill.param_{i}": FloatDistribution(0, 1) for i in range(12)}
    study = optuna.create_study(direction="maximize")
    for v in (0.1, 0.2):
        study.add_trial(create_trial(value=v, params={k: 0.123456 for k in many},
                                     distributions=many, user_attrs={"run_dir": "r"}))
    table = report.format_table(report.top_trials(study))
    assert max(map(len, table.splitlines())) <= 100
    assert "param_11=0.1235" in table and "  #1: " in table


def test_pareto_front_two_objectives_is_optunas():
    study = _study(TWO)
    front = report.pareto_front(study)
    assert {t.number for t in front} == {0, 2, 3}  # 1 is dominated by 0; 4 pruned, 5 over budget
    assert {t.number for t in front} == {t.number for t in study.best_trials}


def test_pareto_front_single_objective_uses_latency():
    study = _study(SINGLE)
    assert [t.number for t in report.pareto_front(study)] == [0, 2, 3]
    text = report.format_report(study)
    assert "Pareto front (first objective vs latency_ms_batch1)" in text
    pareto_part = text.split("Pareto front")[1]
    assert "\n1 " not in pareto_part and "\n0 " in pareto_part


def test_header_counts_ignore_over_budget():
    study = _study(SINGLE)
    study.add_trial(create_trial(state=TrialState.FAIL))
    assert report.trial_counts(study) == {"complete": 4, "pruned": 1, "failed": 1, "running": 0,
                                          "waiting": 0}
    line = report.header_line(study)
    assert "6 trials (4 complete, 1 pruned, 1 failed, 0 running)" in line
    assert "validation_accuracy (max)" in line


@pytest.mark.parametrize("objectives", [SINGLE, TWO], ids=["single", "two"])
def test_write_report_plots_and_json(tmp_path, objectives):
    study = _study(objectives)
    out = report.write_report(study, tmp_path)
    assert matplotlib.rcParams["axes.facecolor"] == "white"  # Optuna's ggplot style did not leak
    for name in ("best_so_far.png", "pareto.png", "importances.png"):
        image = matplotlib.image.imread(tmp_path / name)
        assert image.shape[0] > 100 and image.shape[1] > 100
    assert out["plots"] == ["best_so_far.png", "pareto.png", "importances.png"]
    assert out["plots_skipped"] == {}
    on_disk = json.loads((tmp_path / "sweep_report.json").read_text())
    assert on_disk == out
    assert set(out) == {"study", "objectives", "counts", "top_trials", "pareto", "plots",
                        "plots_skipped"}
    assert [t["number"] for t in out["pareto"]["trials"]] == [0, 2, 3]
    assert out["pareto"]["axes"] == ["validation_accuracy", "latency_ms_batch1"]
    assert out["pareto"]["trials"][0]["values"] == {"validation_accuracy": 0.9,
                                                    "latency_ms_batch1": 2.0}
    assert out["counts"]["complete"] == 4 and out["top_trials"][0]["number"] == 3
    md = (tmp_path / "sweep_report.md").read_text()
    assert "![pareto.png](pareto.png)" in md and "Pareto front" in md


def test_importances_skipped_with_a_reason(tmp_path):
    study = optuna.create_study(direction="maximize")
    for v in (0.1, 0.2, 0.3):  # three trials, but nothing varied
        study.add_trial(create_trial(value=v, params={"optim.lr": 0.01},
                                     distributions={"optim.lr": DISTS["optim.lr"]}))
    written = report.write_plots(study, tmp_path)
    assert [p.rsplit("/", 1)[1] for p in written] == ["best_so_far.png"]
    skipped = report.skipped_plots(study)
    assert "have 3 and 0" in skipped["importances.png"]
    assert "latency_ms_batch1" in skipped["pareto.png"]


def test_empty_study_reports_clearly(tmp_path):
    study = optuna.create_study(direction="maximize")
    assert report.top_trials(study) == [] and report.pareto_front(study) == []
    assert "nothing to rank" in report.format_report(study)
    out = report.write_report(study, tmp_path)
    assert out["plots"] == [] and out["top_trials"] == [] and out["pareto"]["trials"] == []
    assert set(out["plots_skipped"].values()) == {"no complete trials yet"}
    assert "no complete trials yet" in (tmp_path / "sweep_report.md").read_text()
