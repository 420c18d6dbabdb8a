"""`jaxopt-lab sweep` as users run it: killed with kill -9 mid-trial and rerun (sequential,
two workers, vectorized), and two workers on two processes sharing one study through a real
PostgreSQL server."""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import optuna
import pytest
from optuna.trial import TrialState

pytestmark = pytest.mark.slow

CONFIG = """
from jaxopt_lab import default_config, model_config
from jaxopt_lab.tune import space

def get_config():
    c = default_config()
    c.data.name = "digits"
    c.model = model_config("mlp", hidden=(16,))
    c.train.steps, c.train.eval_every, c.train.log_every = {steps}, 500, 500
    c.train.checkpoint_every, c.train.steps_per_call = 100, 1
    c.train.measure = False
    c.sweep.space = (space.log_uniform("optim.lr", 1e-3, 3e-2),)
    c.sweep.trials, c.sweep.sampler = {trials}, "random"
    return c
"""


def write_config(tmp_path, steps=1000, trials=3) -> str:
    path = tmp_path / "sweep.py"
    path.write_text(CONFIG.format(steps=steps, trials=trials))
    return str(path)


def sweep(config: str, workdir, *extra: str, env: dict, wait: bool = True):
    command = [sys.executable, "-m", "jaxopt_lab.cli", "sweep", "--config", config,
               "--workdir", str(workdir), *extra]
    if not wait:
        return subprocess.Popen(command, env={**os.environ, **env}, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    result = subprocess.run(command, env={**os.environ, **env}, capture_output=True, text=True,
                            timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def kill_when(proc: subprocess.Popen, ready, timeout: float = 300.0) -> None:
    """kill -9 the whole process group (the sweep and its workers) once `ready()` holds."""
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.time() < deadline, "the sweep never reached the point to kill it"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def checkpointed(pattern: str):
    """A finished checkpoint (a step directory Orbax has renamed from its temporary name)."""
    return lambda: any(name.isdigit() for d in glob.glob(pattern + "/checkpoints")
                       for name in (os.listdir(d) if os.path.isdir(d) else ()))


def finished_once(workdir, trials: int) -> list[optuna.trial.FrozenTrial]:
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(workdir / "study.journal")))
    (summary,) = optuna.get_all_study_summaries(storage)
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    found = study.get_trials()
    assert sorted(t.number for t in found) == list(range(trials))
    assert [t.state for t in found] == [TrialState.COMPLETE] * trials
    return found


@pytest.mark.parametrize("mode, extra, pattern, trials", [
    ("sequential", (), "trials/1", 3),
    ("workers", ("--workers", "2"), "trials/*", 3),
    ("vectorized", ("--config.sweep.population=2",), "populations/*", 2),  # one population
])
def test_a_killed_sweep_finishes_every_trial_once(tmp_path, env, mode, extra, pattern, trials):
    config = write_config(tmp_path, trials=trials)
    workdir = tmp_path / mode
    proc = sweep(config, workdir, *extra, env=env, wait=False)
    kill_when(proc, checkpointed(str(workdir / pattern)))
    result = sweep(config, workdir, *extra, env=env)
    trials = finished_once(workdir, trials)
    resumed = [t for t in trials if t.user_attrs.get("resumed")]
    assert resumed, "the trial killed mid-run was not resumed"
    summaries = []
    for trial in resumed:
        run_dir = trial.user_attrs.get("run_dir") or trial.user_attrs["population_dir"]
        with open(os.path.join(run_dir, "summary.json")) as f:
            summaries.append(json.load(f))
    # The one killed after its checkpoint went on from it (a parallel one may have had none).
    assert any(s["resumed_from"] is not None for s in summaries)
    assert "val_acc" in result.stdout  # the top-trials table
    status = subprocess.run([sys.executable, "-m", "jaxopt_lab.cli", "sweep", "--status",
                             str(workdir)], capture_output=True, text=True, timeout=120,
                            check=False)
    assert status.returncode == 0 and "complete" in status.stdout
    assert (workdir / "best_so_far.png").exists()


def _postgres_bin(name: str) -> str | None:
    found = shutil.which(name) or sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found if isinstance(found, str) else (found[-1] if found else None)


@pytest.fixture
def postgres_url():
    """A throwaway PostgreSQL server on loopback (run as the `postgres` user when root)."""
    initdb, pg_ctl = _postgres_bin("initdb"), _postgres_bin("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL is not installed (.ci/run installs Debian's postgresql)")
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    data = tempfile.mkdtemp(prefix="jaxopt-pg-")
    if as_user:
        shutil.chown(data, "postgres")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    subprocess.run([*as_user, initdb, "-D", data, "-A", "trust", "-U", "postgres"],
                   check=True, capture_output=True)
    subprocess.run([*as_user, pg_ctl, "-D", data, "-w", "-l", f"{data}/log", "-o",
                    f"-p {port} -k {data} -c listen_addresses=127.0.0.1", "start"],
                   check=True, capture_output=True)
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", data, "-m", "immediate", "stop"],
                       capture_output=True, check=False)
        shutil.rmtree(data, ignore_errors=True)


def test_two_workers_share_one_study_through_postgresql(tmp_path, env, postgres_url):
    """Two processes, each with its own workdir as on two machines, one RDB study."""
    config = write_config(tmp_path, steps=300, trials=6)
    procs = [sweep(config, tmp_path / f"host{i}", "--storage", postgres_url, env=env,
                   wait=False) for i in range(2)]
    for proc in procs:
        assert proc.wait(timeout=600) == 0, proc.stderr.read().decode()[-3000:]
    storage = optuna.storages.RDBStorage(postgres_url)
    (summary,) = optuna.get_all_study_summaries(storage)
    trials = optuna.load_study(study_name=summary.study_name, storage=storage).get_trials()
    counted = [t for t in trials if not t.user_attrs.get("over_budget")]
    assert sorted(t.number for t in counted) == list(range(6))
    assert all(t.state == TrialState.COMPLETE for t in counted)
    assert {t.user_attrs["workdir"] for t in counted} == {
        str(tmp_path / "host0"), str(tmp_path / "host1")}
