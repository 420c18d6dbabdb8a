"""Reliability of the `train` command: kill -9 and SIGTERM resume exactly (SIGTERM also on two
processes under `launch`), a NaN/inf loss stops the run cleanly, a corrupt newest checkpoint is
set aside and the one before is used.

Every run is a real `python -m jaxopt_lab.cli train` subprocess on the MNIST-1D MLP. Data order and
the step's random key are pure functions of (seed, step), so an interrupted-and-resumed run must end
with the same metrics as an uninterrupted one. The last three tests drive the Checkpointer and the
MetricsWriter in process: a damaged data-iterator file, the same step going bad twice, and a
metrics line cut short.
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
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import ROOT, run_cli, xla_flags

from jaxopt_lab.core.metrics import read_metrics

pytestmark = pytest.mark.slow  # real subprocesses: make test-fast leaves them out

CONFIG = "configs/smoke.py"  # the MNIST-1D MLP, one step per compiled call (steps_per_call=1)
QUIET = ["--config.train.progress=False"]
# Long enough (600 steps, a few seconds) to be caught mid-way by a signal; checkpoints every 150
# steps (the last 3 kept), a log record every 10 steps, one evaluation at the end.
LONG_STEPS, LONG_LOG, LONG_CKPT = 600, 10, 150
LAST_THREE = [LONG_STEPS - 2 * LONG_CKPT, LONG_STEPS - LONG_CKPT, LONG_STEPS]
LONG = [*QUIET, f"--config.train.steps={LONG_STEPS}", f"--config.train.log_every={LONG_LOG}",
        f"--config.train.eval_every={LONG_STEPS}", f"--config.train.checkpoint_every={LONG_CKPT}"]
TWO_PROCESSES = ("launch", "-n", "2", "--")
STARTUP_DEADLINE_S = 120  # import + data + compile on a loaded 2-core machine
RUN_TIMEOUT_S = 180


class _Run:
    """One `train` command running in the background; stdout and stderr go to files."""

    def __init__(self, env: dict, workdir: Path, *overrides: str, launch: tuple[str, ...] = (),
                 config: str = CONFIG):
        self.workdir = workdir
        workdir.parent.mkdir(parents=True, exist_ok=True)
        self._out, self._err = (workdir.parent / f"{workdir.name}.{s}" for s in ("out", "err"))
        env = dict(os.environ, **env, XLA_FLAGS=xla_flags(1))
        with open(self._out, "w") as out, open(self._err, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "jaxopt_lab.cli", *launch, "train", "--config", config,
                 "--workdir", str(workdir), *overrides], cwd=ROOT, env=env, stdout=out, stderr=err)

    @property
    def stderr(self) -> str:
        return self._err.read_text()

    def wait(self, timeout: float = RUN_TIMEOUT_S) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.stop()

    def stop(self) -> None:
        """Kills the run if it is still going (a failed test must not leave it behind)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def finish(self, timeout: float = RUN_TIMEOUT_S) -> Path:
        """Waits for a run that must succeed; returns its workdir."""
        assert self.wait(timeout) == 0, self.stderr[-3000:]
        return self.workdir


def _train(env: dict, workdir: Path, *overrides: str, launch: tuple[str, ...] = (),
           config: str = CONFIG) -> subprocess.CompletedProcess:
    return run_cli(*launch, "train", "--config", config, "--workdir", str(workdir), *overrides,
                   env=env, timeout=RUN_TIMEOUT_S)


def _checkpoint_steps(workdir: Path, name: str = "checkpoints") -> list[int]:
    """Committed checkpoints only: orbax writes into a temporary name and renames on commit."""
    directory = workdir / name
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def _metric_steps(workdir: Path) -> list[int]:
    try:
        return [r["step"] for r in read_metrics(str(workdir))]
    except (json.JSONDecodeError, KeyError):  # a line being appended right now
        return []


def _wait_for(predicate, run: _Run, what: str, deadline_s: float = STARTUP_DEADLINE_S) -> None:
    """Polls `predicate` until true; fails if the run exits first or the deadline passes."""
    deadline = time.monotonic() + deadline_s
    while not predicate():
        if run.proc.poll() is not None:
            pytest.fail(f"run exited ({run.proc.returncode}) before {what}:\n{run.stderr[-3000:]}")
        if time.monotonic() > deadline:
            run.stop()
            pytest.fail(f"no {what} within {deadline_s}s:\n{run.stderr[-3000:]}")
        time.sleep(0.02)


def _summary(workdir: Path) -> dict:
    return json.loads((workdir / "summary.json").read_text())


def _assert_same_run(resumed: Path, reference: Path) -> None:
    """Same final test metrics, and the same metrics.jsonl record for record, no step twice."""
    got, want = _summary(resumed), _summary(reference)
    assert got["steps"] == want["steps"] == LONG_STEPS
    for key in ("test_loss", "test_accuracy"):
        assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-9), key
    records, reference_records = read_metrics(str(resumed)), read_metrics(str(reference))
    steps = [r["step"] for r in records]
    assert len(steps) == len(set(steps)), f"duplicate steps in metrics.jsonl: {steps}"
    assert steps == [r["step"] for r in reference_records]
    assert steps[-1] == LONG_STEPS and "test_loss" in records[-1]
    for record, expected in zip(records, reference_records, strict=True):
        assert set(record) == set(expected)
        for key, value in expected.items():
            if key != "steps_per_s":  # wall-clock
                assert record[key] == pytest.approx(value, rel=1e-6, abs=1e-9), (record["step"],
                                                                                  key)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, env):
    """The long command run once, uninterrupted; started at once, in the background, so it runs
    beside the first test's own run. `.finish()` waits for it."""
    run = _Run(env, tmp_path_factory.mktemp("reference") / "run", *LONG)
    yield run
    run.stop()


def _reference(reference_run: _Run) -> Path:
    workdir = reference_run.finish()
    assert _summary(workdir)["resumed_from"] is None
    assert _checkpoint_steps(workdir) == LAST_THREE  # keep_checkpoints=3
    return workdir


def _killed_after_a_checkpoint(env: dict, workdir: Path, *overrides: str, config: str = CONFIG,
                               deadline_s: float = STARTUP_DEADLINE_S) -> Path:
    """Starts the command and kills it with SIGKILL once a checkpoint exists and metrics.jsonl
    has records past it, so the resumed run must drop those records and recompute them."""
    run = _Run(env, workdir, *overrides, config=config)
    try:
        _wait_for(lambda: _checkpoint_steps(workdir) and _metric_steps(workdir)
                  and max(_metric_steps(workdir)) > max(_checkpoint_steps(workdir)),
                  run, "a checkpoint followed by a log record", deadline_s)
        os.kill(run.proc.pid, signal.SIGKILL)
        assert run.wait(timeout=30) == -signal.SIGKILL
    finally:
        run.stop()
    assert not (workdir / "summary.json").exists(), "the run finished before it was killed"
    return workdir


def test_kill_9_then_rerun_resumes_and_matches_an_uninterrupted_run(tmp_path, env, reference_run):
    workdir = _killed_after_a_checkpoint(env, tmp_path / "run", *LONG)
    on_disk = _checkpoint_steps(workdir)
    assert on_disk and max(on_disk) < LONG_STEPS

    result = _train(env, workdir, *LONG)  # the same command again
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr.lower(), result.stderr  # nothing was corrupt
    summary = _summary(workdir)
    assert summary["resumed_from"] == max(on_disk)
    assert summary["resumed_from"] % LONG_CKPT == 0
    _assert_same_run(workdir, _reference(reference_run))


POPULATION = [*LONG, '--config.population=(("optim.lr", (3e-3, 1e-2)), ("seed", (0, 1)))']


def test_a_population_killed_and_rerun_resumes_and_matches_an_uninterrupted_one(tmp_path, env):
    reference = _Run(env, tmp_path / "reference", *POPULATION)
    workdir = _killed_after_a_checkpoint(env, tmp_path / "run", *POPULATION)
    result = _train(env, workdir, *POPULATION)
    assert result.returncode == 0, result.stderr
    got, want = _summary(workdir), _summary(reference.finish())
    assert got["resumed_from"] is not None and got["resumed_from"] % LONG_CKPT == 0
    for mine, theirs in zip(got["members"], want["members"], strict=True):
        assert mine["values"] == theirs["values"]
        for key in ("validation_loss", "test_loss", "test_accuracy"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-6, abs=1e-9), key
    records, expected = read_metrics(str(workdir)), read_metrics(str(tmp_path / "reference"))
    assert [(r["step"], r["member"]) for r in records] == [
        (r["step"], r["member"]) for r in expected]
    for record, theirs in zip(records, expected, strict=True):
        assert record["loss"] == pytest.approx(theirs["loss"], rel=1e-6), record["step"]


@pytest.mark.parametrize("signum, exit_code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_or_ctrl_c_saves_at_the_current_step_exits_and_resumes(
        tmp_path, env, reference_run, signum, exit_code):
    workdir = tmp_path / "run"
    run = _Run(env, workdir, *LONG)
    try:
        # A checkpoint on disk means the training loop (and its signal handlers) is running.
        _wait_for(lambda: _checkpoint_steps(workdir), run, "a first checkpoint")
        first_seen = max(_checkpoint_steps(workdir))
        os.kill(run.proc.pid, signum)
        returncode = run.wait(timeout=60)
    finally:
        run.stop()
    stderr = run.stderr
    assert returncode == exit_code, stderr
    assert "Traceback" not in stderr, stderr
    match = re.search(rf"{signum.name}: checkpoint saved at step (\d+)", stderr)
    assert match, stderr
    saved = int(match.group(1))
    # The signal came after the loop had passed `first_seen`; it is acted on at the next log
    # boundary, where a checkpoint is written whether or not that step is a checkpoint step.
    assert first_seen < saved < LONG_STEPS and saved % LONG_LOG == 0
    assert _checkpoint_steps(workdir)[-1] == saved
    assert (workdir / "checkpoints" / str(saved) / "commit_success.txt").exists()
    assert max(_metric_steps(workdir)) == saved
    assert not (workdir / "summary.json").exists()

    result = _train(env, workdir, *LONG)
    assert result.returncode == 0, result.stderr
    assert _summary(workdir)["resumed_from"] == saved
    _assert_same_run(workdir, _reference(reference_run))


@pytest.fixture
def reference_run_two_processes(tmp_path_factory, env):
    """The long command uninterrupted on two processes, in the background. It is compared with
    its interrupted twin, not with the one-process run: the two part by float rounding at first
    (~1e-7), and over 600 steps that grows to percents."""
    run = _Run(env, tmp_path_factory.mktemp("reference2") / "run", *LONG, launch=TWO_PROCESSES)
    yield run
    run.stop()


def test_sigterm_to_the_launcher_stops_both_processes_at_one_step_and_resumes(
        tmp_path, env, reference_run_two_processes):
    """The launcher forwards SIGTERM; the two processes agree (an allgather at a log boundary) on
    the step to stop at, save it together and exit 143; the same command then resumes."""
    workdir, launch = tmp_path / "run", TWO_PROCESSES
    run = _Run(env, workdir, *LONG, launch=launch)
    try:
        _wait_for(lambda: _checkpoint_steps(workdir), run, "a first checkpoint")
        os.kill(run.proc.pid, signal.SIGTERM)
        returncode = run.wait(timeout=90)
    finally:
        run.stop()
    stderr = run.stderr
    assert returncode == 143, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    saved = {int(s) for s in re.findall(r"SIGTERM: checkpoint saved at step (\d+)", stderr)}
    assert len(re.findall("SIGTERM: checkpoint saved", stderr)) == 2, stderr[-3000:]
    assert len(saved) == 1, f"the processes stopped at different steps: {saved}"
    (saved,) = saved
    assert saved < LONG_STEPS and saved % LONG_LOG == 0
    assert (workdir / "checkpoints" / str(saved) / "commit_success.txt").exists()

    result = _train(env, workdir, *LONG, launch=launch)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _summary(workdir)["resumed_from"] == saved
    assert _summary(workdir)["processes"] == 2
    reference = reference_run_two_processes.finish()
    assert _summary(reference)["resumed_from"] is None
    _assert_same_run(workdir, reference)


def test_a_second_ctrl_c_stops_at_once_without_a_traceback(tmp_path, env):
    """The first Ctrl-C asks for a checkpoint at the next log boundary (far away here); the second
    stops at once: exit 130, one line, no checkpoint."""
    workdir = tmp_path / "run"
    run = _Run(env, workdir, "--config.train.progress=True", "--config.train.steps=1000000",
               "--config.train.log_every=500000", "--config.train.eval_every=1000000",
               "--config.train.checkpoint_every=500000")
    try:
        _wait_for(lambda: "train:" in run.stderr, run, "the progress bar (the loop started)")
        os.kill(run.proc.pid, signal.SIGINT)
        _wait_for(lambda: "saving a checkpoint at the next log boundary" in run.stderr, run,
                  "the first Ctrl-C's message", deadline_s=30)
        os.kill(run.proc.pid, signal.SIGINT)
        returncode = run.wait(timeout=60)
    finally:
        run.stop()
    assert returncode == 130, run.stderr
    assert "Traceback" not in run.stderr and "jaxopt-lab: interrupted" in run.stderr, run.stderr
    assert not _checkpoint_steps(workdir)


def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, env):
    """SGD at lr=100 diverges after a few steps. The same step is named whether steps run one per
    call (checkpoints every 2) or scanned four per call (every 4); the two runs go side by side."""
    from jaxopt_lab import load_run

    runs = {k: _Run(env, tmp_path / f"k{k}", *QUIET, "--config.optim.name=sgd",
                    "--config.optim.lr=100", "--config.train.steps=100",
                    "--config.train.eval_every=100", f"--config.train.steps_per_call={k}",
                    f"--config.train.log_every={every}",
                    f"--config.train.checkpoint_every={every}")
            for k, every in ((1, 2), (4, 4))}
    failing_steps = []
    for run in runs.values():
        workdir = run.workdir
        assert run.wait() == 2, run.stderr
        lines = [line for line in run.stderr.splitlines() if line.strip()]
        assert len(lines) == 1, run.stderr  # one line, no traceback
        match = re.fullmatch(r"jaxopt-lab: error: loss or gradients became non-finite at step "
                             r"(\d+); stopped\. Last good checkpoint: step (\d+) in (.+)", lines[0])
        assert match, lines[0]
        failing, named = int(match.group(1)), int(match.group(2))
        assert Path(match.group(3)) == workdir / "checkpoints"
        failing_steps.append(failing)

        on_disk = _checkpoint_steps(workdir)
        assert on_disk and named == on_disk[-1] < failing  # the first checkpoint came before it
        # The boundary that detected the failure (>= failing) is a checkpoint step: not saved.
        assert all(step < failing for step in on_disk)
        records = read_metrics(str(workdir))
        assert records and all(r["step"] < failing for r in records)
        assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in records)
        assert not (workdir / "summary.json").exists()
    assert failing_steps[0] == failing_steps[1], failing_steps

    restored = load_run(str(runs[1].workdir))  # the last good checkpoint holds finite numbers
    assert restored.step == _checkpoint_steps(runs[1].workdir)[-1]
    leaves = jax.tree.leaves((restored.state.params, restored.state.opt_state))
    assert leaves and all(np.isfinite(np.asarray(x)).all() for x in leaves)


def _truncate_array_data(state_dir: Path) -> None:
    """What a crash mid-write leaves: every OCDBT data file cut to half its length."""
    data_files = [p for p in state_dir.rglob("*") if p.is_file() and p.parent.name == "d"]
    assert data_files, sorted(state_dir.rglob("*"))
    for path in data_files:
        os.truncate(path, path.stat().st_size // 2)


def _garble_metadata(state_dir: Path) -> None:
    (state_dir / "_METADATA").write_text('{"tree_metadata": {')


def test_corrupt_newest_checkpoint_is_set_aside_and_the_one_before_resumed(
        tmp_path, env, reference_run):
    """Copies of the finished reference run with its last checkpoint corrupted (data files
    truncated; tree metadata garbled): rerunning the command resumes from the one before and ends
    exactly as the reference did."""
    reference = _reference(reference_run)
    runs = []
    for corrupt in (_truncate_array_data, _garble_metadata):
        workdir = tmp_path / corrupt.__name__.strip("_")
        shutil.copytree(reference, workdir)
        (workdir / "summary.json").unlink()
        corrupt(workdir / "checkpoints" / str(LONG_STEPS) / "state")
        runs.append(_Run(env, workdir, *LONG))
    for run in runs:
        workdir = run.workdir
        assert run.wait() == 0, run.stderr
        warnings = [line for line in run.stderr.splitlines() if line.startswith("warning:")]
        assert len(warnings) == 1, run.stderr
        assert f"checkpoint at step {LONG_STEPS} is unreadable" in warnings[0]
        assert str(workdir / "checkpoints_corrupt") in warnings[0]

        assert _summary(workdir)["resumed_from"] == LONG_STEPS - LONG_CKPT
        assert _checkpoint_steps(workdir, "checkpoints_corrupt") == [LONG_STEPS]
        assert (workdir / "checkpoints_corrupt" / str(LONG_STEPS) / "state").is_dir()
        assert _checkpoint_steps(workdir) == LAST_THREE  # the last one trained again, re-saved
        _assert_same_run(workdir, reference)


def test_corrupt_data_iterator_position_is_set_aside_too(tmp_path, capfd):
    """data.on_device=False: a newest checkpoint whose grain position file is truncated is as
    corrupt as one with truncated arrays. In process, on the Checkpointer alone (no compiling)."""
    from jaxopt_lab.core.checkpoint import Checkpointer
    from jaxopt_lab.data.pipeline import make_grain_loader

    arrays = {"x": np.arange(160, dtype=np.float32).reshape(40, 4),
              "label": np.arange(40, dtype=np.int32)}

    def iterator():
        return iter(make_grain_loader(arrays, batch_size=4, seed=0))

    directory = tmp_path / "checkpoints"
    checkpointer = Checkpointer(str(directory), keep=3)
    position, batches = iterator(), []
    for step in (3, 6):
        batches += [next(position) for _ in range(3)]
        checkpointer.save(step, {"w": np.full(3, step, np.float32)}, position)
    checkpointer.close()
    (data_file,) = (directory / "6" / "data").glob("process_*.json")
    os.truncate(data_file, data_file.stat().st_size // 2)

    checkpointer = Checkpointer(str(directory), keep=3)
    resumed = iterator()
    try:
        restored = checkpointer.restore({"w": np.zeros(3, np.float32)}, data_iterator=resumed)
    finally:
        checkpointer.close()
    assert "checkpoint at step 6 is unreadable" in capfd.readouterr().err
    assert restored is not None
    state, step = restored
    assert step == 3 and np.asarray(state["w"]).tolist() == [3.0] * 3
    np.testing.assert_array_equal(next(resumed)["label"], batches[3]["label"])
    assert _checkpoint_steps(tmp_path, "checkpoints_corrupt") == [6]


def test_the_same_step_corrupted_again_is_set_aside_again(tmp_path, capfd):
    """A newest checkpoint that keeps coming out broken (a full disk at the same step): every
    rerun must still fall back to the one before it."""
    from jaxopt_lab.core.checkpoint import Checkpointer

    directory = str(tmp_path / "checkpoints")
    for attempt in range(3):
        checkpointer = Checkpointer(directory, keep=3)
        if attempt == 0:
            checkpointer.save(1, {"w": np.zeros(3, np.float32)})
        checkpointer.save(2, {"w": np.ones(3, np.float32)})
        checkpointer.close()
        _garble_metadata(tmp_path / "checkpoints" / "2" / "state")
        checkpointer = Checkpointer(directory, keep=3)
        try:
            restored = checkpointer.restore({"w": np.zeros(3, np.float32)})
        finally:
            checkpointer.close()
        assert restored is not None and restored[1] == 1, attempt
        assert "checkpoint at step 2 is unreadable" in capfd.readouterr().err
    assert len(list((tmp_path / "checkpoints_corrupt").iterdir())) == 3


def test_resume_survives_a_metrics_line_cut_short(tmp_path):
    from jaxopt_lab.core.metrics import MetricsWriter

    writer = MetricsWriter(str(tmp_path))
    writer.write(10, {"loss": 1.0})
    writer.write(20, {"loss": 0.5})
    writer.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 30, "lo')  # the process died inside this write
    MetricsWriter(str(tmp_path)).truncate_after(20)  # what a resume from step 20 does
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [10, 20]
