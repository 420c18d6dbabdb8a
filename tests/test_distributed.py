"""One config on 1 device, on 4 simulated devices and on 2 real processes (`jaxopt-lab launch`);
streamed through grain on 1 process and on 2 processes x 2 devices: with the same global batch,
the runs end at the same parameters. And the launcher's failure handling.

Every run is a subprocess (`XLA_FLAGS=--xla_force_host_platform_device_count=N`; processes join
with `jax.distributed.initialize()` on loopback, gloo collectives). The runs are started together
by the module fixture, a few at a time, so the file's wall time is set by the two cores, not by
the sum of the runs. Each run has a timeout after which its whole process group is killed: a hang
fails its test instead of blocking the suite.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import ROOT, xla_flags

from jaxopt_lab import load_run
from jaxopt_lab.core.metrics import read_metrics

pytestmark = pytest.mark.slow  # real subprocesses: make test-fast leaves them out

STEPS = 20
TRAIN = ("train", "--config", "configs/smoke.py", f"--config.train.steps={STEPS}",
         "--config.train.eval_every=20", "--config.train.log_every=10",
         "--config.train.checkpoint_every=20", "--config.train.progress=False")
# The streamed runs also use another seed, so the on-device runs have a run to differ from.
STREAMED = ("--config.data.on_device=False", "--config.seed=1")
# float32 sums of 100 per-example gradients, split in 1, 2 or 4 partial sums, then 20 Adam steps:
# observed differences are ~4e-7 on parameters of size ~0.1, a different seed differs by ~0.2.
RTOL, ATOL = 1e-4, 1e-5
RUN_TIMEOUT = 240  # seconds per subprocess; a healthy run takes 10-40 s on a busy 2-core CPU

# A config whose rank 1 fails: in get_config (before joining the run), or on its batch size
# (after joining: 101 is not divisible by the 2 devices, while rank 0 goes on with 100).
RANK1_FAILS = textwrap.dedent("""\
    import os

    from jaxopt_lab import default_config, model_config


    def get_config():
        rank1 = os.environ.get("JAXOPT_LAB_PROCESS_ID") == "1"
        if rank1 and WHERE == "config":
            raise ValueError("rank 1 refuses this config")
        config = default_config()
        config.model = model_config("mlp")
        config.train.steps = 20
        config.train.steps_per_call = 1
        config.train.progress = False
        if rank1:
            config.data.batch_size = 101
        return config
    """)


@dataclasses.dataclass
class Job:
    args: tuple[str, ...]
    devices: int = 1
    timeout: float = RUN_TIMEOUT
    workdir: Path | None = None


@dataclasses.dataclass
class Result:
    returncode: int | None  # None: timed out and killed
    stdout: str
    stderr: str
    wall_s: float
    survivors: bool  # processes of the run's session still alive after it returned
    stderr_at: list[tuple[float, str]]  # (seconds since the start, line) as each line came

    def check(self) -> Result:
        assert self.returncode == 0, f"exit {self.returncode} after {self.wall_s:.0f} s:\n" \
                                     f"{self.stderr[-3000:]}"
        return self

    def first_seen(self, text: str) -> float:
        """Seconds from the start until a stderr line containing `text` came."""
        return next(t for t, line in self.stderr_at if text in line)


def _session_members(sid: int) -> list[int]:
    """Live processes of session `sid`: the launcher's children lead their own process groups
    but stay in its session."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


class Runs:
    """Runs jobs (`python -m jaxopt_lab.cli ARGS`) in the background, `workers` at a time."""

    def __init__(self, jobs: dict[str, Job], workers: int):
        self.jobs = jobs
        self._live: set[subprocess.Popen] = set()
        self._lock = threading.Lock()
        self._closing = False
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, "distributed-run")
        self._futures: dict[str, concurrent.futures.Future] = {}

    def start(self, names) -> None:
        for name in names:
            if name not in self._futures:
                self._futures[name] = self._pool.submit(self._run, self.jobs[name])

    def __getitem__(self, name: str) -> Result:
        self.start([name])
        return self._futures[name].result()

    def _run(self, job: Job) -> Result:
        env = dict(os.environ, XLA_FLAGS=xla_flags(job.devices))
        start = time.perf_counter()
        with self._lock:
            if self._closing:
                raise RuntimeError("module finished")
            proc = subprocess.Popen(
                [sys.executable, "-m", "jaxopt_lab.cli", *job.args], cwd=ROOT, env=env,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                start_new_session=True)  # the launcher and its children share one session
            self._live.add(proc)
        stdout, stderr_at = [], []
        readers = [threading.Thread(target=lambda: stdout.extend(proc.stdout)),
                   threading.Thread(target=lambda: stderr_at.extend(
                       (time.perf_counter() - start, line) for line in proc.stderr))]
        for reader in readers:
            reader.start()
        try:
            code = proc.wait(timeout=job.timeout)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            with self._lock:
                self._live.discard(proc)
        wall = time.perf_counter() - start
        survivors = bool(_session_members(proc.pid))
        self._kill(proc)  # whatever the session still holds, so that the pipes close
        for reader in readers:
            reader.join()
        return Result(code, "".join(stdout), "".join(line for _, line in stderr_at), wall,
                      survivors, stderr_at)

    @staticmethod
    def _kill(proc: subprocess.Popen) -> None:
        for pid in _session_members(proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def close(self) -> None:
        with self._lock:
            self._closing = True
            for proc in self._live:
                self._kill(proc)
        self._pool.shutdown(wait=True, cancel_futures=True)


def _jobs(root: Path) -> dict[str, Job]:
    def train(name, *extra, devices=1, launch=(), timeout=RUN_TIMEOUT):
        workdir = root / name
        args = (*launch, *TRAIN, "--workdir", str(workdir), *extra)
        return Job(args, devices, timeout, workdir)

    two = ("launch", "-n", "2", "--")
    two_by_two = ("launch", "-n", "2", "--devices-per-process", "2", "--")
    for where in ("config", "batch"):
        (root / f"rank1_{where}.py").write_text(f"WHERE = {where!r}\n" + RANK1_FAILS)
    return {  # in the order they start
        # Started first: it waits on the other process most of its time.
        "rank1_fails_after_joining": Job(("launch", "-n", "2", "--", "train", "--config",
                                          str(root / "rank1_batch.py"), "--workdir",
                                          str(root / "rank1_batch")), timeout=150),
        "one": train("one"),
        "four": train("four", devices=4),
        "two_procs": train("two_procs", launch=two),
        "streamed_one": train("streamed_one", *STREAMED),
        "streamed_two_procs": train("streamed_two_procs", *STREAMED, launch=two_by_two),
        "bad_override": train("bad_override", "--config.optim.lrx=1", launch=two, timeout=90),
        "rank1_bad_config": Job(("launch", "-n", "2", "--", "train", "--config",
                                 str(root / "rank1_config.py"), "--workdir",
                                 str(root / "rank1_config")), timeout=90),
        # Batch 5 fits no mesh: the error names the device count without training anything.
        "inherited_device_flags": train("inherited_device_flags", "--config.data.batch_size=5",
                                        devices=4, launch=two, timeout=90),
    }


# Which runs each test reads, so the fixture starts only what the selected tests need.
NEEDS = {
    "test_one_device_four_devices_and_processes_train_to_the_same_parameters": (
        "one", "four", "two_procs", "streamed_one"),
    "test_multi_process_workdir_is_written_once": ("one", "two_procs", "streamed_two_procs"),
    "test_streamed_two_processes_match_one_process": ("streamed_one", "streamed_two_procs"),
    "test_launch_with_a_bad_config_exits_2_promptly": ("bad_override",),
    "test_launch_stops_the_other_processes_when_one_fails": ("rank1_bad_config",),
    "test_launch_exits_promptly_when_a_process_fails_after_joining": (
        "rank1_fails_after_joining",),
    "test_launch_devices_per_process_overrides_inherited_xla_flags": (
        "inherited_device_flags",),
}


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory, _data_dir):
    pool = Runs(_jobs(tmp_path_factory.mktemp("distributed")), workers=3)
    needed = {name for item in request.session.items
              if getattr(item, "module", None) is request.module
              for name in NEEDS.get(item.originalname, ())}
    pool.start(name for name in pool.jobs if name in needed)
    yield pool
    pool.close()


def summary(job: Job) -> dict:
    return json.loads((job.workdir / "summary.json").read_text())


@functools.cache
def final_state(workdir: Path):
    run = load_run(str(workdir))
    assert run.step == STEPS
    return jax.device_get(run.state)


def assert_close(actual, desired, what: str) -> None:
    leaves_a, tree_a = jax.tree.flatten(actual)
    leaves_d, tree_d = jax.tree.flatten(desired)
    assert tree_a == tree_d, what
    for a, d in zip(leaves_a, leaves_d, strict=True):
        np.testing.assert_allclose(a, d, rtol=RTOL, atol=ATOL, err_msg=what)


def assert_same_run(runs: Runs, name: str, reference: str, devices: int, processes: int):
    """`name` reports its devices and processes, and ends where `reference` does."""
    runs[name].check()
    got, ref = summary(runs.jobs[name]), summary(runs.jobs[reference])
    assert (got["devices"], got["processes"], got["steps"]) == (devices, processes, STEPS)
    assert got["test_loss"] == pytest.approx(ref["test_loss"], rel=RTOL)
    assert got["test_accuracy"] == pytest.approx(ref["test_accuracy"], abs=2e-3)  # 2 of 1000
    losses = [[r["loss"] for r in read_metrics(str(runs.jobs[n].workdir))] for n in (name, reference)]
    np.testing.assert_allclose(losses[0], losses[1], rtol=RTOL)  # logged train loss, steps 10, 20
    state, ref_state = final_state(runs.jobs[name].workdir), final_state(runs.jobs[reference].workdir)
    assert_close(state.params, ref_state.params, f"{name} params vs {reference}")
    assert_close(state.opt_state, ref_state.opt_state, f"{name} opt_state vs {reference}")


def test_one_device_four_devices_and_processes_train_to_the_same_parameters(runs):
    runs["one"].check()
    reference = summary(runs.jobs["one"])
    assert (reference["devices"], reference["processes"]) == (1, 1)
    params = final_state(runs.jobs["one"].workdir).params
    assert_same_run(runs, "four", "one", devices=4, processes=1)
    assert_same_run(runs, "two_procs", "one", devices=2, processes=2)
    # The comparison can fail: a run with another seed (init and data order) ends far outside
    # the tolerance.
    runs["streamed_one"].check()
    other = final_state(runs.jobs["streamed_one"].workdir)
    assert summary(runs.jobs["streamed_one"])["test_loss"] != pytest.approx(
        reference["test_loss"], rel=RTOL)
    with pytest.raises(AssertionError):
        assert_close(other.params, params, "seed 1 vs seed 0")


def test_multi_process_workdir_is_written_once(runs):
    for name in ("two_procs", "streamed_two_procs"):
        result, workdir = runs[name].check(), runs.jobs[name].workdir
        # Only process 0 prints the summary and writes the run directory.
        assert result.stdout.count("run directory:") == 1
        assert summary(runs.jobs[name])["processes"] == 2
        lines = (workdir / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["step"] for line in lines] == [10, 20]
        assert [r["step"] for r in read_metrics(str(workdir)) if "test_loss" in r] == [20]
        assert len(list((workdir / "tensorboard").glob("events.out.tfevents.*"))) == 1
        assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["20"]
    assert json.loads((runs.jobs["two_procs"].workdir / "config.json").read_text()) == json.loads(
        (runs.jobs["one"].workdir / "config.json").read_text())


def test_streamed_two_processes_match_one_process(runs):
    """Through grain each of 2 processes (2 devices each) reads its half of every global batch of
    100; were the halves not the single process's batch split in two, the runs would part."""
    runs["streamed_one"].check()
    assert summary(runs.jobs["streamed_one"])["devices"] == 1
    assert_same_run(runs, "streamed_two_procs", "streamed_one", devices=4, processes=2)
    # Each process saved its own data-iterator position with the checkpoint.
    data_dir = runs.jobs["streamed_two_procs"].workdir / "checkpoints" / "20" / "data"
    assert sorted(p.name for p in data_dir.glob("process_*")) == [
        "process_0-of-2.json", "process_1-of-2.json"]


def test_launch_with_a_bad_config_exits_2_promptly(runs):
    result = runs["bad_override"]
    assert result.returncode == 2, result.stderr[-3000:]
    # Each child that reads the config says so once; the launcher may stop the second before it does.
    assert 1 <= result.stderr.count("unknown config key 'optim.lrx'") <= 2
    assert "Traceback" not in result.stderr
    assert not result.survivors
    assert result.wall_s < 60
    assert not runs.jobs["bad_override"].workdir.exists()


def test_launch_stops_the_other_processes_when_one_fails(runs):
    """Rank 1 fails on its config; rank 0, already waiting to join, is stopped by the launcher."""
    result = runs["rank1_bad_config"]
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.count("rank 1 refuses this config") == 1
    assert not result.survivors
    assert result.wall_s < 60


def test_launch_exits_promptly_when_a_process_fails_after_joining(runs):
    """Timed from rank 1's error, not from the start (starting two JAX processes on a busy
    CI machine alone can take a minute): a launcher that waited for rank 0 would end only at
    rank 0's own 30 s gloo deadline; this one stops it at once (~1 s here)."""
    result = runs["rank1_fails_after_joining"]
    assert result.returncode == 2, f"exit {result.returncode} after {result.wall_s:.0f} s"
    failed_at = result.first_seen("data.batch_size=101 must be divisible by the 2 devices")
    assert result.wall_s - failed_at < 20, f"ended {result.wall_s - failed_at:.0f} s after"
    assert not result.survivors


def test_launch_devices_per_process_overrides_inherited_xla_flags(runs):
    result = runs["inherited_device_flags"]
    assert result.returncode == 2, result.stderr[-2000:]
    assert "must be divisible by the 2 devices of the mesh" in result.stderr, result.stderr[-2000:]


@pytest.mark.slow
def test_four_simulated_devices_train_a_heavy_step_without_deadlock(tmp_path):
    """With compiled calls queued ahead, XLA:CPU's devices on 2 cores deadlocked in the
    all-reduce of the 128-channel CNN (some devices entered the next step's collective holding
    the threads the last one needed): the loop keeps one call in flight on CPU."""
    from helpers import QUIET, run_cli, summary_of

    result = run_cli("train", "--config", "configs/mnist1d_cnn.py", *QUIET,
                     "--config.model.channels=128", "--config.train.steps=60",
                     "--config.train.steps_per_call=1", "--workdir", str(tmp_path / "run"),
                     devices=4, timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    assert summary_of(tmp_path / "run")["devices"] == 4
