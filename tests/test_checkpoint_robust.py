"""Checkpoints that survive a flaky disk and many hosts: a failed read is classified before anything
is moved (`core/checkpoint.py::failure_kind`), processes agree on the step they restore, and a
compressed run's comm_state (one entry per device) does not tie its checkpoint to a device count.

The first tests drive the Checkpointer in process on small dicts (no compiling); the last two run
the CLI in subprocesses: two processes under `launch` (a transient read error injected on process
1; a data position only process 1 finds unreadable) and a compressed run trained on 4 simulated
devices, evaluated and exported on 1, resumed on 2.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import QUIET, SHORT, SMALL_CNN, run_cli, summary_of
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxopt_lab.core import checkpoint
from jaxopt_lab.core.checkpoint import READ_FAULT_ENV, Checkpointer, failure_kind
from jaxopt_lab.errors import UserError

TS_SPEC = " [tensorstore_spec='{\"driver\":\"zarr\"}']"


@pytest.mark.parametrize("error, kind", [
    (FileNotFoundError("Metadata file (named _METADATA) does not exist"), "unreadable"),
    (json.JSONDecodeError("Expecting value", "{", 1), "unreadable"),
    (checkpoint.Unreadable("restored values are not finite"), "unreadable"),
    (ValueError('OUT_OF_RANGE: Error reading "w/0" in OCDBT database: Requested byte range '
                "[0, 1073584) is not valid for value of size 1072880"), "unreadable"),
    (ValueError('DATA_LOSS: Error opening "zarr" driver: Error decoding b-tree node' + TS_SPEC),
     "unreadable"),
    (ValueError('Error opening "zarr" driver: ZSTD_decompressStream() failed' + TS_SPEC),
     "unreadable"),  # INVALID_ARGUMENT: tensorstore leaves that code out
    (ValueError('NOT_FOUND: Error reading "w/0" [OS error 2: ENOENT No such file]'), "unreadable"),
    (OSError(errno.EIO, "Input/output error"), "transient"),
    (OSError(errno.ESTALE, "Stale file handle"), "transient"),
    (TimeoutError("timed out"), "transient"),
    (ValueError('UNAVAILABLE: Error reading "w/0" in OCDBT database'), "transient"),
    (ValueError('UNKNOWN: Error reading "w/0" [OS error 5: Input/output error]'), "transient"),
    (ValueError('DEADLINE_EXCEEDED: Error reading "gs://bucket/run/w/0"'), "transient"),
    (ValueError("User-provided restore item and on-disk value metadata tree structures do not "
                "match"), "other"),
    (RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 4294967296 bytes"), "other"),
    (MemoryError(), "other"),
    (UserError("checkpoint does not fit this config"), "other"),
])
def test_failure_kinds(error, kind):
    assert failure_kind(error) == kind


def _saved(directory: Path, steps=(1, 2)) -> str:
    """Checkpoints of {"w": [step] * 3} at `steps`."""
    checkpointer = Checkpointer(str(directory), keep=5)
    for step in steps:
        checkpointer.save(step, {"w": np.full(3, step, np.float32)})
    checkpointer.close()
    return str(directory)


def _restore(directory: str, step=None, **kwargs):
    checkpointer = Checkpointer(directory, keep=5)
    try:
        return checkpointer.restore({"w": np.zeros(3, np.float32)}, step, **kwargs)
    finally:
        checkpointer.close()


def _set_aside(tmp_path: Path) -> list[str]:
    corrupt = tmp_path / "checkpoints_corrupt"
    return sorted(p.name for p in corrupt.iterdir()) if corrupt.is_dir() else []


@pytest.fixture
def no_backoff(monkeypatch):
    monkeypatch.setattr(checkpoint, "RESTORE_BACKOFF_S", 0.0)


def test_a_transient_read_error_is_retried_and_nothing_moves(tmp_path, monkeypatch, capfd,
                                                             no_backoff):
    directory = _saved(tmp_path / "checkpoints")
    monkeypatch.setenv(READ_FAULT_ENV, "0")  # this process's first read fails once
    state, step = _restore(directory)
    assert step == 2 and np.asarray(state["w"]).tolist() == [2.0] * 3
    err = capfd.readouterr().err
    assert "warning: reading checkpoint at step 2 failed" in err and "try 2 of 3" in err, err
    assert "unreadable" not in err and _set_aside(tmp_path) == []


def test_a_transient_error_that_persists_is_refused_in_one_line_and_nothing_moves(
        tmp_path, monkeypatch, capfd, no_backoff):
    directory = _saved(tmp_path / "checkpoints")

    def unreachable(*args):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(Checkpointer, "_read", unreachable)
    with pytest.raises(UserError, match=r"checkpoint at step 2 in .+ could not be read in 3 "
                                        r"tries \(\[Errno 5\] Input/output error\); it stays"):
        _restore(directory)
    assert capfd.readouterr().err.count("warning: reading checkpoint at step 2 failed") == 2
    assert _set_aside(tmp_path) == [] and sorted(os.listdir(directory)) == ["1", "2"]


def test_an_error_that_proves_nothing_is_raised_as_it_is_and_nothing_moves(tmp_path, monkeypatch):
    directory = _saved(tmp_path / "checkpoints")

    def out_of_memory(*args):
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 4294967296 bytes")

    monkeypatch.setattr(Checkpointer, "_read", out_of_memory)
    with pytest.raises(RuntimeError, match="Out of memory"):
        _restore(directory)
    assert _set_aside(tmp_path) == [] and sorted(os.listdir(directory)) == ["1", "2"]


def _truncate_data(state_dir: Path) -> None:
    for path in (p for p in state_dir.rglob("*") if p.is_file() and p.parent.name == "d"):
        os.truncate(path, path.stat().st_size // 2)


def _remove_tree_metadata(state_dir: Path) -> None:
    (state_dir / "_METADATA").unlink()


def _remove_data(state_dir: Path) -> None:
    for path in (p for p in state_dir.rglob("*") if p.is_file() and p.parent.name == "d"):
        path.unlink()


@pytest.mark.parametrize("damage", [_truncate_data, _remove_tree_metadata, _remove_data])
def test_an_unreadable_checkpoint_is_set_aside_and_the_one_before_restored(tmp_path, capfd,
                                                                           damage):
    directory = _saved(tmp_path / "checkpoints")
    damage(tmp_path / "checkpoints" / "2" / "state")
    state, step = _restore(directory)
    assert step == 1 and np.asarray(state["w"]).tolist() == [1.0] * 3
    warnings = [line for line in capfd.readouterr().err.splitlines()
                if line.startswith("warning:")]
    assert len(warnings) == 1 and "checkpoint at step 2 is unreadable" in warnings[0], warnings
    assert _set_aside(tmp_path) == ["2"] and os.listdir(directory) == ["1"]


def test_a_requested_unreadable_step_is_refused_and_not_moved(tmp_path):
    directory = _saved(tmp_path / "checkpoints")
    _truncate_data(tmp_path / "checkpoints" / "2" / "state")
    with pytest.raises(UserError, match=r"checkpoint at step 2 in .+ is unreadable: OUT_OF_RANGE"):
        _restore(directory, step=2)
    with pytest.raises(UserError, match=r"no checkpoint at step 3 in .+; available: \[1, 2\]"):
        _restore(directory, step=3)
    assert _set_aside(tmp_path) == [] and sorted(os.listdir(directory)) == ["1", "2"]


def _with_comm_state(lead: tuple[int, ...], devices: int, fill) -> dict:
    """A state shaped like a TrainState (lead=()) or a population's (lead=(members,)):
    comm_state has a device axis after `lead`."""
    return {"params": {"w": np.full((*lead, 3), 5.0, np.float32)},
            "comm_state": {"residual": np.full((*lead, devices, 3), fill, np.float32)}}


@pytest.mark.parametrize("lead", [(), (2,)], ids=["state", "population"])
def test_comm_state_written_on_another_device_count_is_left_out(tmp_path, lead):
    """Written on 4 devices, restored on this process's one: params restore, comm_state keeps
    the target's value (zeros for an abstract target), and the change is reported once; without
    a handler for it, refused in one line."""
    checkpointer = Checkpointer(str(tmp_path / "checkpoints"), keep=1)
    checkpointer.save(7, _with_comm_state(lead, devices=4, fill=3.0))
    checkpointer.close()
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    split = NamedSharding(mesh, P(*[None] * len(lead), "data"))
    fresh = _with_comm_state(lead, devices=1, fill=-1.0)
    concrete = {"params": {"w": jax.device_put(np.zeros_like(fresh["params"]["w"]),
                                               NamedSharding(mesh, P()))},
                "comm_state": {"residual": jax.device_put(fresh["comm_state"]["residual"], split)}}
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                            concrete)
    for target, expected in ((concrete, -1.0), (abstract, 0.0)):
        reports = []
        checkpointer = Checkpointer(str(tmp_path / "checkpoints"), keep=1)
        try:
            state, step = checkpointer.restore(
                target, on_device_count_change=lambda *counts, seen=reports: seen.append(counts))
            with pytest.raises(UserError, match=r"checkpoint at step 7 in .+ was written on 4 "
                                                r"devices, this run has 1; use a new --workdir"):
                checkpointer.restore(target)
        finally:
            checkpointer.close()
        assert step == 7 and reports == [(4, 1)]
        np.testing.assert_array_equal(state["params"]["w"], np.full((*lead, 3), 5.0))
        residual = state["comm_state"]["residual"]
        assert residual.shape == (*lead, 1, 3) and residual.sharding == split
        np.testing.assert_array_equal(residual, np.full((*lead, 1, 3), expected))
    assert _set_aside(tmp_path) == []


# --- subprocesses -------------------------------------------------------------------------------

TWO_PROCESSES = ("launch", "-n", "2", "--")
STREAMED = ["--config", "configs/smoke.py", *QUIET, "--config.train.steps=20",
            "--config.train.log_every=10", "--config.train.eval_every=20",
            "--config.train.checkpoint_every=10", "--config.data.on_device=False"]


def _copy(workdir: Path, to: Path) -> Path:
    shutil.copytree(workdir, to)
    (to / "summary.json").unlink()
    return to


@pytest.mark.slow
def test_two_processes_agree_on_the_step_and_only_an_unreadable_one_is_set_aside(tmp_path, env):
    """Two processes streaming their own halves of each batch (each saves its own data position)
    train 20 steps, checkpoints at 10 and 20; copies of the run are resumed to 30. A read error
    injected once on process 1 is retried: both resume step 20, nothing moved. Process 1's data
    position at step 20 cut short (process 0 reads its own fine): both resume step 10, and step
    20 is set aside, by process 0 alone."""
    base = tmp_path / "base"
    result = run_cli(*TWO_PROCESSES, "train", *STREAMED, "--workdir", str(base), env=env)
    assert result.returncode == 0, result.stderr[-3000:]

    flaky = _copy(base, tmp_path / "flaky")
    result = run_cli(*TWO_PROCESSES, "train", *STREAMED, "--config.train.steps=30", "--workdir",
                     str(flaky), env={**env, READ_FAULT_ENV: "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("warning: reading checkpoint at step 20 failed") == 1, result.stderr
    assert f"injected by {READ_FAULT_ENV}" in result.stderr
    assert result.stderr.count("resumed from step 20") == 1, result.stderr  # the chief's line
    assert summary_of(flaky)["resumed_from"] == 20 and summary_of(flaky)["steps"] == 30
    assert not (tmp_path / "flaky" / "checkpoints_corrupt").exists()

    damaged = _copy(base, tmp_path / "damaged")
    position = damaged / "checkpoints" / "20" / "data" / "process_1-of-2.json"
    os.truncate(position, position.stat().st_size // 2)
    result = run_cli(*TWO_PROCESSES, "train", *STREAMED, "--config.train.steps=30", "--workdir",
                     str(damaged), env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "checkpoint at step 20 is unreadable" in warnings[0], warnings
    assert result.stderr.count("resumed from step 10") == 1, result.stderr
    assert summary_of(damaged)["resumed_from"] == 10 and summary_of(damaged)["steps"] == 30
    assert sorted(os.listdir(damaged / "checkpoints_corrupt")) == ["20"]


COMPRESSED = [*SMALL_CNN, *SHORT, "--config.techniques.compress.method=topk"]


@pytest.mark.slow
def test_a_compressed_run_from_4_devices_evaluates_and_exports_on_1_and_resumes_on_2(tmp_path,
                                                                                     env):
    from jaxopt_lab import load_run

    workdir = tmp_path / "run"
    result = run_cli("train", *COMPRESSED, "--workdir", str(workdir), devices=4, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    trained = summary_of(workdir)
    assert trained["devices"] == 4

    result = run_cli("eval", "--workdir", str(workdir), devices=1, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    evaluated = json.loads(result.stdout.strip().splitlines()[-1])
    assert evaluated["step"] == 20
    assert evaluated["test_loss"] == pytest.approx(trained["test_loss"], rel=1e-5)
    result = run_cli("export", "--workdir", str(workdir), "--out", str(tmp_path / "model.hlo"),
                     devices=1, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "model.hlo").stat().st_size > 0
    run = load_run(str(workdir))  # this process: one device; comm_state left out, as zeros
    assert run.step == 20
    for leaf in jax.tree.leaves(run.state.comm_state):
        assert leaf.shape[0] == 1 and not np.asarray(leaf).any()

    result = run_cli("train", *COMPRESSED, "--config.train.steps=30", "--workdir", str(workdir),
                     devices=2, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == [("warning: the checkpoint's comm_state was written on 4 data-parallel "
                         "devices; re-initialised for 2")], result.stderr
    assert "resumed from step 20" in result.stderr
    resumed = summary_of(workdir)
    assert (resumed["devices"], resumed["resumed_from"], resumed["steps"]) == (2, 20, 30)
