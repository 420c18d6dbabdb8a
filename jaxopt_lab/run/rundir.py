"""The run directory's own bookkeeping: checking a workdir before anything is built, and recording
in `run.json` how every invocation on it was made.

A workdir is checked first because every mistake about it is otherwise found late and badly: a file
in the way or a read-only disk surfaces as an OSError traceback, and a workdir that holds another
model's run used to get its config.json overwritten before the checkpoint refused to restore,
leaving a directory whose config no longer describes its checkpoints.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import jax
import ml_collections

from jaxopt_lab.errors import UserError

# The stack a result depends on: AQT breaks on JAX upgrades, orbax changes its checkpoint format.
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "aqtp", "jaxopt-lab")
# Keys a resumed run may change: how long it trains (train.steps extends it), how often it logs,
# evaluates and checkpoints, what it measures at the end and how the data reach it. None of them
# changes the weights a step computes, so config.json may record the new values.
RESUMABLE = ("train.steps", "train.eval_every", "train.eval_batch_size", "train.log_every",
             "train.checkpoint_every", "train.keep_checkpoints", "train.progress",
             "train.measure", "data.workers", "data.prefetch")
# Blocks a run does not read: the settings of the procedures around runs (a sweep, optimize).
NOT_READ_BY_A_RUN = ("sweep", "optimize")


def prepare_workdir(workdir: str, config: ml_collections.ConfigDict, *, is_chief: bool) -> None:
    """Makes `workdir` ready for `config`; the chief writes config.json and appends to run.json.

    Every process runs the checks (each may see its own disk); only the chief writes.

    Raises:
      UserError: the path is a file, cannot be created or is not writable, or it holds a run of
        another model or data set, or of this model with other values than those of `RESUMABLE`
        (train.steps extends a run; see `_check_same_run`).
    """
    check_workdir(workdir, config)
    if is_chief:
        record_run(workdir, config)


def check_workdir(workdir: str, config: ml_collections.ConfigDict) -> None:
    """The checks of `prepare_workdir`, writing nothing (see there)."""
    _ensure_writable_dir(workdir)
    _check_same_run(workdir, config)


def record_run(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Writes config.json and appends this invocation to run.json. The loop calls it once the
    checkpoint has restored, so a config the checkpoint refuses leaves the saved one alone."""
    _write_atomically(os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=2))
    record_provenance(workdir)


def _ensure_writable_dir(workdir: str) -> None:
    if not workdir:
        raise UserError("--workdir is empty")
    if os.path.isfile(workdir):
        raise UserError(f"--workdir {workdir} is a file, not a directory")
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        blocker = next((p for p in Path(workdir).parents if p.is_file()), None)
        reason = f"{blocker} is a file" if blocker else (e.strerror or type(e).__name__)
        raise UserError(f"--workdir {workdir} cannot be created: {reason}") from None
    try:  # os.access says yes to root even on a read-only mount; a real file tells the truth
        with tempfile.TemporaryFile(dir=workdir):
            pass
    except OSError as e:
        raise UserError(f"--workdir {workdir} is not writable: "
                        f"{e.strerror or type(e).__name__}") from None


def _has_checkpoint(directory: str) -> bool:
    """True if orbax committed a step there (uncommitted ones carry a temporary suffix)."""
    try:
        return any(entry.name.isdigit() for entry in os.scandir(directory))
    except OSError:
        return False


def _check_same_run(workdir: str, config: ml_collections.ConfigDict) -> None:
    """A workdir with checkpoints may only be resumed by the same model on the same data, with
    the same values but those of `RESUMABLE`.

    A changed value elsewhere (optim.lr, a technique's option) would be written into config.json
    while the checkpoint holds weights (and injected optimizer values) trained with the old one:
    the directory would describe a run that never happened. Keys only one side has (a run
    written before the key existed) are not compared.
    """
    config_path = os.path.join(workdir, "config.json")
    if not os.path.exists(config_path) or not _has_checkpoint(os.path.join(workdir, "checkpoints")):
        return  # nothing to resume: any config may start here
    try:
        with open(config_path) as f:
            saved = json.load(f)
        saved_model, saved_data = dict(saved["model"]), saved["data"]["name"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{config_path} is unreadable ({type(e).__name__}: {e}) but {workdir} "
                        "holds checkpoints: restore that file or use a new --workdir") from None
    current = json.loads(config.to_json_best_effort())  # tuples become lists, as when saved
    model, data = current["model"], config.data.name
    if saved_model == model and saved_data == data:
        _check_same_values(workdir, saved, current)
        return
    # Another model differs in everything; the same model is named with the hyperparameters.
    differing = [] if saved_model.get("name") != model.get("name") else sorted(
        k for k in saved_model.keys() | model.keys() if saved_model.get(k) != model.get(k))

    def describe(block: dict) -> str:
        extra = ", ".join(f"{k}={block.get(k)!r}" for k in differing)
        return f"{block.get('name')!r}" + (f" ({extra})" if extra else "")

    raise UserError(f"{workdir} holds a run of model {describe(saved_model)} on {saved_data!r}; "
                    f"this config trains {describe(model)} on {data!r}: use a new --workdir")


def _check_same_values(workdir: str, saved: dict, current: dict) -> None:
    """One line naming every key whose value differs from the saved run's (but `RESUMABLE`)."""
    before, after = dict(_flat(saved)), dict(_flat(current))
    differing = [k for k in sorted(before.keys() & after.keys())
                 if before[k] != after[k] and k not in RESUMABLE
                 and k.split(".")[0] not in NOT_READ_BY_A_RUN]
    if differing:
        changes = ", ".join(f"{k}={before[k]!r} there, {after[k]!r} here" for k in differing)
        raise UserError(f"{workdir} holds a run trained with other values ({changes}): its "
                        "checkpoints were not trained with these; rerun with the run's values "
                        f"or use a new --workdir (a resume may change only {', '.join(RESUMABLE)})")


def _flat(tree: dict, prefix: str = "") -> Iterator[tuple[str, object]]:
    """(dotted key, value) of every leaf of a config as JSON holds it."""
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flat(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def warn_if_unfinished(workdir: str, step: int, steps: int, use: str) -> None:
    """One line on stderr where `use` (quantize, export, a teacher) reads a run whose newest
    checkpoint stops short of its train.steps: a run interrupted at step 20 of 300 would
    otherwise be converted or taught from as if it were the trained model.

    A run that ended there on purpose says so in its summary.json and is not warned about: early
    stopping (`stopped_at`) and a shrunk run's step-0 checkpoint (`shrunk_from`).
    """
    if step >= steps or _ended_there(workdir, step):
        return
    print(f"warning: {use} reads {workdir} at step {step} of its train.steps={steps}: the run "
          "stopped early (rerun its train command to finish it)", file=sys.stderr)


def _ended_there(workdir: str, step: int) -> bool:
    try:
        with open(os.path.join(workdir, "summary.json")) as f:
            summary = json.load(f)
    except (OSError, ValueError):
        return False
    return summary.get("stopped_at") == step or ("shrunk_from" in summary and step == 0)


def record_provenance(workdir: str) -> dict:
    """Appends how this process was started to `workdir/run.json`; returns that record.

    A rerun on the workdir (a resume) appends, so the file lists every invocation that wrote its
    checkpoints: `{"invocations": [{...}, ...]}`. Nothing here may fail a run: a missing git or
    package is recorded as such, an unreadable run.json is set aside with a warning.
    """
    devices = jax.devices()
    record = {
        "argv": list(sys.argv),
        "cwd": os.getcwd(),  # argv's relative paths (configs/x.py) mean something only from here
        "time_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "versions": {name: _version(name) for name in PACKAGES},
        **_git_commit(),
        "backend": jax.default_backend(),
        "device_kinds": sorted({d.device_kind for d in devices}),
        "device_count": len(devices),
        "process_count": jax.process_count(),
    }
    path = os.path.join(workdir, "run.json")
    invocations = _read_invocations(path)
    invocations.append(record)
    _write_atomically(path, json.dumps({"invocations": invocations}, indent=2))
    return record


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _git_commit() -> dict:
    """HEAD of the checkout this package is imported from, and whether tracked files differ.

    None for both when that is not a git checkout of its own (an installed wheel, even one inside
    some other repository), git is missing or slow. Untracked files do not count as dirty: run
    directories and notebooks would make every checkout dirty.
    """
    source = Path(__file__).resolve().parents[2]  # the directory holding jaxopt_lab/

    def git(*args: str) -> str:
        # --no-optional-locks: status must not take index.lock from someone committing meanwhile.
        return subprocess.run(["git", "--no-optional-locks", "-C", str(source), *args],
                              capture_output=True, text=True, timeout=10, check=True).stdout.strip()

    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != source:
            return {"git_commit": None, "git_dirty": None}
        return {"git_commit": git("rev-parse", "HEAD"),
                "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": None, "git_dirty": None}


def _read_invocations(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    try:
        with open(path) as f:
            invocations = json.load(f)["invocations"]
        if isinstance(invocations, list):
            return invocations
        raise TypeError("'invocations' is not a list")
    except (OSError, ValueError, KeyError, TypeError) as e:
        aside = path + ".unreadable"
        print(f"warning: {path} is unreadable ({type(e).__name__}: {e}); moved to {aside}, "
              "starting a new record", file=sys.stderr)
        os.replace(path, aside)
        return []


def _write_atomically(path: str, text: str) -> None:
    """Writes via a temporary file and a rename, so a kill mid-write, or another process reading
    meanwhile, never sees half a file."""
    temporary = f"{path}.tmp{os.getpid()}"
    with open(temporary, "w") as f:
        f.write(text)
    os.replace(temporary, path)
