"""`jaxopt-lab report RUN...`: runs side by side as a table of their summary fields (a population
by its best member) and their learning curves as one PNG; a directory without a summary gets one
line."""

from __future__ import annotations

import pytest
from helpers import run_cli, tiny_config

from jaxopt_lab import train_and_evaluate
from jaxopt_lab.errors import UserError
from jaxopt_lab.profile.runs_report import report_runs


@pytest.mark.slow
def test_runs_side_by_side_with_their_own_numbers_and_curves(tmp_path):
    single = tiny_config("mlp", steps=10, log_every=5, eval_every=5, measure=False)
    single.data.validation_fraction = 0.1
    population = single.copy_and_resolve_references()
    population.population = (("optim.lr", (1e-4, 3e-2)),)
    summaries = {name: train_and_evaluate(config, str(tmp_path / "a" / name))
                 for name, config in (("single", single), ("population", population))}
    # Two runs of one name in different folders are named by their paths.
    train_and_evaluate(single, str(tmp_path / "b" / "single"))

    runs = [str(tmp_path / "a" / "single"), str(tmp_path / "a" / "population")]
    result = run_cli("report", *runs, "--plot", str(tmp_path / "curves.png"))
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {line.split(" | ")[0].lstrip("| "): line for line in result.stdout.splitlines()
            if line.startswith("| ") and "---" not in line}
    best = summaries["population"]["best_member"]
    member = summaries["population"]["members"][best]
    assert f"{100 * summaries['single']['test_accuracy']:.2f}" in rows["single"]
    assert f"{100 * member['test_accuracy']:.2f}" in rows[f"population[member {best}]"]
    assert "val acc %" in rows["run"]
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    table = report_runs([runs[0], str(tmp_path / "b" / "single")], plot=None)
    assert str(tmp_path / "a" / "single") in table and str(tmp_path / "b" / "single") in table


def test_a_directory_without_a_summary_is_one_line(tmp_path):
    result = run_cli("report", str(tmp_path), "--plot", "")
    assert result.returncode == 2
    assert f"{tmp_path} holds no summary.json: not a finished run" in result.stderr
    assert "Traceback" not in result.stderr
    with pytest.raises(UserError, match="at least one run"):
        report_runs([], plot=None)
