"""Risky operations are refused, or warned about in one line, before they cost anything: a
misspelled sweep objective, a sweep whose every trial fails, a changed config on a run's workdir,
shrinking a run that was never channel-pruned, converting or teaching from a run stopped early,
a compressor on one device, `--out` naming a directory, a technique's bad value while it is off,
a warm-up longer than the run, a population's misspelled key, and a stop signal during
`optimize` or `sweep` (issue 24). Also `quantize` of a QAT run of a Dense-only module of your own.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import types
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import ROOT, run_cli, tiny_config, xla_flags
from optuna.trial import TrialState

from jaxopt_lab import build_run, default_config, model_config, train_and_evaluate, validate
from jaxopt_lab.core.interrupt import Preempted, StopSignals
from jaxopt_lab.core.population import member_values, set_values
from jaxopt_lab.core.tasks import make_task
from jaxopt_lab.errors import UserError
from jaxopt_lab.export import export_run
from jaxopt_lab.optimize import pipeline
from jaxopt_lab.run import loop
from jaxopt_lab.tune import space
from jaxopt_lab.tune import sweep as sweep_module
from jaxopt_lab.tune.sweep import check_sweep, prepare, run_sweep
from jaxopt_lab.tune.trials import TASK_METRICS
from jaxopt_lab.workflows.convert import float_model, quantize_run
from jaxopt_lab.workflows.shrink import check_channel_pruned, shrink_run


def one_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert len(lines) == 1, text
    return lines[0]


# --- sweeps ----------------------------------------------------------------------------------


def sweep_config(**sweep):
    """A digits MLP sweep over the learning rate (nothing here trains unless a test says so)."""
    c = default_config()
    c.data.name = "digits"
    c.model = model_config("mlp", hidden=(16,))
    c.train.steps, c.train.eval_every, c.train.log_every = 30, 10, 10
    c.train.checkpoint_every, c.train.steps_per_call, c.train.measure = 30, 1, False
    c.sweep.space = (space.log_uniform("optim.lr", 1e-3, 1e-1),)
    c.sweep.trials, c.sweep.startup_trials = 2, 1
    for key, value in sweep.items():
        c.sweep[key] = value
    validate(c)
    return c


@pytest.mark.parametrize("objective, data, message", [
    ("validation_acc", "digits", ("'validation_acc' is not measured: data set 'digits' "
                                 "(classification) gives validation_loss, validation_accuracy")),
    ("validation_accuracy", "diabetes", ("'validation_accuracy' is not measured: data set "
                                        "'diabetes' (regression) gives validation_loss, "
                                        "validation_mse")),
])
def test_an_objective_the_run_does_not_measure_is_refused_before_any_trial(
        tmp_path, objective, data, message):
    config = sweep_config(objectives=((objective, "maximize"),))
    config.data.name = data
    with pytest.raises(UserError, match=re.escape(message)):
        prepare(config, str(tmp_path / "sweep"))
    assert not (tmp_path / "sweep").exists()


def test_task_metrics_are_what_each_task_evaluates():
    """TASK_METRICS (what a validation_* objective may name) against each task's eval_fn."""

    class Zeros(nn.Module):  # outputs shaped as each task's model gives them
        shape: tuple

        def __call__(self, x):
            return jnp.zeros((x.shape[0], *self.shape))

    cases = {"classification": ((3,), np.zeros((2, 4), np.float32), np.zeros(2, np.int32)),
             "regression": ((1,), np.zeros((2, 4), np.float32), np.zeros(2, np.float32)),
             "language_model": ((5, 7), np.zeros((2, 5), np.int32), np.zeros((2, 5), np.int32))}
    assert set(cases) == set(TASK_METRICS)
    for task, (shape, x, label) in cases.items():
        eval_fn = make_task(task, Zeros(shape)).eval_fn
        metrics = jax.eval_shape(eval_fn, {}, {}, {"x": x, "label": label})
        assert set(metrics) == set(TASK_METRICS[task]), task


SWEEP_ALL_FAIL = """
from jaxopt_lab import default_config, model_config
from jaxopt_lab.tune import space

def get_config():
    c = default_config()
    c.data.name = "digits"
    c.model = model_config("mlp", hidden=(16,))
    c.train.measure, c.train.progress = False, False
    c.optim.schedule = "warmup_cosine"
    c.sweep.trials, c.sweep.startup_trials = 2, 1
    # train.steps is swept too, so only each trial can tell its warm-up is too long
    c.sweep.space = (space.categorical("train.steps", (10, 20)),
                     space.integer("optim.warmup_steps", 30, 40))
    return c
"""


def test_a_sweep_whose_every_trial_fails_exits_2_with_the_reason(tmp_path):
    """Each trial samples a warm-up longer than its run: refused per trial (nothing trains),
    and the sweep says so in one line instead of exiting 0."""
    path = tmp_path / "sweep_config.py"
    path.write_text(SWEEP_ALL_FAIL)
    result = run_cli("sweep", "--config", str(path), "--workdir", str(tmp_path / "sweep"))
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and re.fullmatch(
        r"jaxopt-lab: error: all 2 trials of the sweep failed; the first: optim.warmup_steps="
        r"\d+ exceeds this trial's train.steps=\d+: the learning rate would never reach "
        r"optim.lr", errors[0]), result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "sweep" / "trials" / "0" / "checkpoints").exists()


def test_a_warmup_range_longer_than_the_run_is_refused_before_any_trial():
    config = sweep_config()
    config.sweep.space = (*space.schedule_family(("constant", "warmup_cosine"), warmup=(5, 40)),)
    with pytest.raises(UserError, match=r"sweep.space 'optim.warmup_steps' reaches 40, more "
                                        r"than train.steps=30"):
        check_sweep(config)
    config.sweep.space = (*space.schedule_family(("constant", "warmup_cosine"), warmup=(5, 30)),)
    check_sweep(config)


# --- the config's own checks ---------------------------------------------------------------


def test_a_warmup_longer_than_the_run_is_one_warning_line(capfd):
    config = tiny_config("mlp", steps=20)
    config.optim.schedule, config.optim.warmup_steps = "warmup_cosine", 50
    validate(config)
    assert config.optim.warmup_steps == 50  # what trains, as config.json will say
    assert one_line(capfd.readouterr().err) == (
        "warning: optim.warmup_steps=50 exceeds train.steps=20: the learning rate never "
        "reaches optim.lr in this run")
    config.optim.warmup_steps = -1
    with pytest.raises(UserError, match="optim.warmup_steps must be >= 0, got -1"):
        validate(config)


@pytest.mark.parametrize("key, value, message", [
    ("prune.sparsity", 1.5, "techniques.prune.sparsity=1.5 must be a number in [0, 1)"),
    ("prune.schedule", "slow", "techniques.prune.schedule='slow' is unknown"),
    ("quantize.bits", 3, "techniques.quantize.bits"),
    ("distill.temperature", -1.0, "techniques.distill.temperature=-1.0 must be a number > 0"),
    ("distill.teacher_logits", "cached", "techniques.distill.teacher_logits='cached' is unknown"),
    ("compress.ratio", 1.5, "techniques.compress.ratio=1.5 must be a number in (0, 1]"),
])
def test_every_techniques_values_are_checked_while_it_is_off(key, value, message):
    config = tiny_config()
    name, option = key.split(".")
    config.techniques[name][option] = value
    with pytest.raises(UserError, match=re.escape(message)):
        validate(config)


def test_techniques_left_off_with_their_defaults_validate():
    """prune's end_step=-1 ('three quarters of the run') even on a one-step run; distill with
    no teacher and no teacher_config is off."""
    config = tiny_config(steps=1)
    assert config.techniques.prune.end_step == -1 and config.techniques.distill.teacher == ""
    validate(config)
    config.techniques.prune.begin_step = 500  # moot while off
    validate(config)


def test_a_populations_allowed_keys_always_name_label_smoothing():
    with pytest.raises(UserError, match=r"population key 'loss.label_smothing' is not a "
                                        r"per-trial value; allowed: .*loss\.label_smoothing"):
        member_values((("loss.label_smothing", (0.0, 0.1)),), hparams={})
    assert member_values((("loss.label_smoothing", (0.0, 0.1)),), hparams={}) == [
        {"loss.label_smoothing": 0.0}, {"loss.label_smoothing": 0.1}]
    state = types.SimpleNamespace(hparams={}, opt_state=None)
    with pytest.raises(UserError, match="the loss reads no label smoothing"):
        set_values(state, {"loss.label_smoothing": [0.0, 0.1]})


def test_a_population_sweeping_label_smoothing_builds():
    config = tiny_config()
    config.population = (("loss.label_smoothing", (0.0, 0.1)),)
    validate(config)
    run = build_run(config, train=False)
    assert run.members == [{"loss.label_smoothing": 0.0}, {"loss.label_smoothing": 0.1}]


# --- a run's workdir, and what reads a run --------------------------------------------------


@pytest.fixture(scope="module")
def short_run(tmp_path_factory) -> str:
    """A 10-step MLP run whose config says 20 steps: stopped half way (as a Ctrl-C leaves it)."""
    workdir = str(tmp_path_factory.mktemp("runs") / "short")
    loop.train_run(tiny_config("mlp", steps=20, measure=False), workdir, until=10)
    return workdir


def test_a_changed_config_on_a_workdir_is_refused_and_safe_keys_resume(short_run, tmp_path):
    workdir = str(shutil.copytree(short_run, tmp_path / "run"))
    config_json = os.path.join(workdir, "config.json")
    with open(config_json) as f:
        saved = f.read()
    config = tiny_config("mlp", steps=20, measure=False)
    config.optim.lr = 1e-3
    with pytest.raises(UserError, match=r"holds a run trained with other values \(optim.lr="
                                        r"0.01 there, 0.001 here\)"):
        train_and_evaluate(config, workdir)
    with open(config_json) as f:
        assert f.read() == saved
    longer = tiny_config("mlp", steps=30, measure=False, log_every=5)  # documented safe keys
    summary = train_and_evaluate(longer, workdir)
    assert (summary["resumed_from"], summary["steps"]) == (10, 30)


def test_a_changed_config_from_the_cli_is_one_line(short_run, tmp_path):
    workdir = str(shutil.copytree(short_run, tmp_path / "run"))
    # configs/smoke.py differs from the run's config only in keys safe to change, and optim.lr
    result = run_cli("train", "--config", "configs/smoke.py", "--workdir", workdir,
                     "--config.optim.lr=1e-3")
    assert result.returncode == 2, result.stderr[-3000:]
    assert one_line(result.stderr).startswith(
        f"jaxopt-lab: error: {workdir} holds a run trained with other values (optim.lr=0.01 "
        "there, 0.001 here): its checkpoints were not trained with these")


def test_shrinking_a_run_never_channel_pruned_is_refused(short_run):
    with pytest.raises(UserError, match=f"^{re.escape(short_run)} was never pruned: shrink cuts "
                                        "the channels"):
        shrink_run(short_run)
    unstructured = types.SimpleNamespace(experiment=types.SimpleNamespace(
        techniques={"prune": {"pattern": "unstructured"}}))
    with pytest.raises(UserError, match="was pruned with pattern='unstructured'"):
        check_channel_pruned(unstructured, "RUN")


def test_export_and_quantize_of_a_run_stopped_early_warn(short_run, tmp_path, capfd):
    with pytest.raises(UserError, match=f"--out {re.escape(str(tmp_path))} is a directory: "
                                        "name the file to write"):
        export_run(short_run, str(tmp_path))
    capfd.readouterr()
    export_run(short_run, str(tmp_path / "model.stablehlo"))
    assert one_line(capfd.readouterr().err) == (
        f"warning: export reads {short_run} at step 10 of its train.steps=20: the run stopped "
        "early (rerun its train command to finish it)")
    summary = quantize_run(short_run, scheme="w8")
    assert summary["method"] == "ptq"
    assert f"warning: quantize reads {short_run} at step 10 of its train.steps=20" in (
        capfd.readouterr().err)


def test_a_teacher_stopped_early_warns(short_run, capfd):
    config = tiny_config("mlp", steps=20, measure=False)
    config.techniques.distill.teacher = short_run
    validate(config)
    capfd.readouterr()
    build_run(config, train=False)
    assert (f"warning: distill teacher {short_run} is at step 10 of its train.steps=20: the run "
            "stopped early") in capfd.readouterr().err


def test_a_compressor_on_one_device_warns_and_marks_its_numbers(tmp_path, capfd):
    config = tiny_config("mlp", steps=10, measure=False)
    config.techniques.compress.update(method="topk", ratio=0.1, min_size=64)
    summary = train_and_evaluate(config, str(tmp_path / "run"))
    assert summary["devices"] == 1 and summary["comm_simulated"] is True
    assert summary["comm_ratio"] > 1  # still what each device would send
    warnings = [line for line in capfd.readouterr().err.splitlines()
                if "techniques.compress" in line]
    assert warnings == [
        ("warning: techniques.compress (topk) on 1 data-parallel device: nothing is "
        "communicated; it changes training as it would on several, and comm_bytes_per_step / "
        "comm_ratio are what each device would send (summary.json marks them comm_simulated)")]
    many = types.SimpleNamespace(mesh=types.SimpleNamespace(size=2),
                                 experiment=types.SimpleNamespace(techniques={"compress": {}}))
    assert not loop._simulates_communication(many)  # multi-device summaries keep their keys


class DenseOnly(nn.Module):
    """A user's module with the one seam it uses: no conv_general_dilated_cls field."""

    num_classes: int = 10
    dot_general_cls: Any = None

    @nn.compact
    def __call__(self, x):
        for width in (16, 16):  # the second is quantized: the first and last are skipped
            x = nn.relu(nn.Dense(width, dot_general_cls=self.dot_general_cls)(x))
        return nn.Dense(self.num_classes, dot_general_cls=self.dot_general_cls)(x)


def test_quantize_of_a_qat_run_of_a_dense_only_module(tmp_path):
    """Issue 24, case 2: `float_model` passed conv_general_dilated_cls to a module without it."""
    config = tiny_config("mlp", steps=10, measure=False)
    config.techniques.quantize.method = "qat"
    workdir = str(tmp_path / "qat")
    train_and_evaluate(config, workdir, model=DenseOnly())
    summary = quantize_run(workdir, scheme="w8")
    assert summary["method"] == "qat" and summary["serving_bit_identical"]
    assert math.isfinite(summary["float_latency_ms_batch1"])
    wrapped = types.SimpleNamespace(experiment=types.SimpleNamespace(
        model=DenseOnly(dot_general_cls=nn.Dense), techniques={"quantize": {}}))
    assert float_model(wrapped).dot_general_cls is None


# --- stop signals around several runs -------------------------------------------------------


def test_a_stop_at_a_runs_last_boundary_goes_to_the_procedure_around_it():
    with StopSignals(announce=False) as outer, StopSignals(announce=False) as inner:
        # To this thread: `os.kill` may land on another thread (OpenVINO's, ONNX Runtime's, once
        # a test imported them), and be handled only after the block restored the handlers.
        signal.raise_signal(signal.SIGINT)
    assert inner.received == outer.received == [signal.SIGINT]


def test_optimize_stops_at_the_next_step_after_a_ctrl_c(tmp_path, monkeypatch):
    """A Ctrl-C that comes while the baseline finishes (or profiles) stops the pipeline before
    its next step, with 130, as `train` stops."""

    def baseline_interrupted(config, run_dir, name, progress):
        signal.raise_signal(signal.SIGINT)  # after the run's own handlers are gone

    monkeypatch.setattr(pipeline, "_train", baseline_interrupted)
    monkeypatch.setattr(pipeline, "profile_config", lambda *a, **k: pytest.fail("went on"))
    with pytest.raises(Preempted, match="SIGINT: optimize stopped after training the "
                                        "baseline; rerun the same command to resume") as caught:
        pipeline.optimize("configs/digits_cnn.py", str(tmp_path), progress=False)
    assert caught.value.exit_code == 130


def test_a_sweep_stops_between_trials_after_a_ctrl_c(tmp_path, monkeypatch):
    asked = []

    def interrupted(job, config, workdir, objectives, study):
        asked.append(job.directory)
        signal.raise_signal(signal.SIGINT)  # while the job runs: it ends, the next must not start
        for trial in job.trials:
            study.tell(trial, state=TrialState.FAIL)

    monkeypatch.setattr(sweep_module, "run_job", interrupted)
    config = sweep_config(population=1)
    with pytest.raises(Preempted, match="SIGINT: the sweep stopped between trials") as caught:
        run_sweep(config, str(tmp_path / "sweep"), progress=False)
    assert caught.value.exit_code == 130 and asked == ["trials/0"]


def test_ctrl_c_during_optimize_saves_and_exits_130_in_one_line(tmp_path):
    """The CLI: a Ctrl-C while the baseline trains saves its checkpoint, prints one line and
    exits 130 (it used to be ignored, and a second one ended in a traceback)."""
    workdir = tmp_path / "opt"
    args = ["--config.train.steps=100000", "--config.train.log_every=20",
            "--config.train.checkpoint_every=20", "--config.train.eval_every=100000",
            "--config.train.steps_per_call=1", "--config.train.progress=False"]
    returncode, stderr = _interrupted_once_checkpointed(
        tmp_path, ["optimize", "--config", "configs/digits_cnn.py", "--workdir", str(workdir),
                   *args], workdir / "baseline" / "checkpoints")
    assert returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    assert re.search(r"^SIGINT: checkpoint saved at step \d+ in .*baseline/checkpoints; rerun "
                     r"the same command to resume$", stderr, re.MULTILINE), stderr
    assert not (workdir / "baseline" / "summary.json").exists()
    assert json.loads((workdir / "baseline" / "config.json").read_text())["train"]["steps"]


SWEEP_LONG = """
from jaxopt_lab import default_config, model_config
from jaxopt_lab.tune import space

def get_config():
    c = default_config()
    c.data.name = "digits"
    c.model = model_config("mlp", hidden=(16,))
    c.train.steps, c.train.log_every, c.train.checkpoint_every = 100000, 20, 20
    c.train.eval_every, c.train.steps_per_call, c.train.measure = 100000, 1, False
    c.sweep.trials, c.sweep.startup_trials = 2, 1
    c.sweep.space = (space.log_uniform("optim.lr", 1e-3, 1e-1),)
    return c
"""


def _interrupted_once_checkpointed(tmp_path, command: list[str], checkpoints) -> tuple[int, str]:
    """Starts `jaxopt-lab COMMAND`, sends one SIGINT once `checkpoints` holds a checkpoint;
    returns the exit code and stderr."""
    err = tmp_path / "err"
    env = dict(os.environ, XLA_FLAGS=xla_flags(1))
    with open(err, "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "jaxopt_lab.cli", *command], cwd=ROOT,
                                env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        deadline = time.monotonic() + 240
        while not (checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir())):
            assert proc.poll() is None, err.read_text()[-3000:]
            assert time.monotonic() < deadline, err.read_text()[-3000:]
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        return proc.wait(timeout=120), err.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_ctrl_c_during_a_sweep_saves_the_trial_and_exits_130_in_one_line(tmp_path):
    path = tmp_path / "sweep_config.py"
    path.write_text(SWEEP_LONG)
    workdir = tmp_path / "sweep"
    returncode, stderr = _interrupted_once_checkpointed(
        tmp_path, ["sweep", "--config", str(path), "--workdir", str(workdir)],
        workdir / "trials" / "0" / "checkpoints")
    assert returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    assert re.search(r"^SIGINT: checkpoint saved at step \d+ in .*trials/0/checkpoints; rerun "
                     r"the same command to resume$", stderr, re.MULTILINE), stderr
