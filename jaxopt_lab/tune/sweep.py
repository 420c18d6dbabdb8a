"""`run_sweep(config, workdir)`: an Optuna study over a config's `sweep.space`, run to
`sweep.trials` trials by one or more workers, each trial (or population of trials) in its own
run directory under the workdir.

Crash-proof by construction: a worker holds a lock file on each job it trains; a trial left
RUNNING by a worker that died (kill -9, a lost machine) has a free lock, so the next worker on
the same host and workdir claims it and resumes its run directory from the last checkpoint —
the trial is told once, never asked again. Rerunning the same command therefore finishes the
study with every trial exactly once. Workers on other machines share the study through an RDB
URL (PostgreSQL), Optuna's own distributed mode.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import ml_collections
import optuna
from optuna.trial import TrialState
from tqdm.auto import tqdm

from jaxopt_lab.compose.config import validate
from jaxopt_lab.core.config import has_validation
from jaxopt_lab.core.interrupt import Preempted, StopSignals
from jaxopt_lab.errors import UserError
from jaxopt_lab.tune.samplers import check_names, make_pruner, make_sampler
from jaxopt_lab.tune.space import Dimension, apply, check_space, suggest
from jaxopt_lab.tune.trials import MEASURED, Job, check_measured, run_job, shape_key
from jaxopt_lab.tune.widths import width_dims

RECORD = "sweep.json"  # the sweep's config and storage, so a rerun and its workers agree
DIRECTIONS = ("maximize", "minimize")


def check_sweep(config: ml_collections.ConfigDict) -> list[Dimension]:
    """Everything about `config.sweep` checked before a trial runs; its dimensions.

    Raises:
      UserError: one line naming the culprit.
    """
    sweep = config.sweep
    objectives = [tuple(o) for o in sweep.objectives]
    if not objectives:
        raise UserError("sweep.objectives is empty: name at least one (metric, direction)")
    for objective in objectives:
        if len(objective) != 2 or objective[1] not in DIRECTIONS:
            raise UserError(f"sweep.objectives entry {objective!r} must be (metric, "
                            f"'maximize' or 'minimize')")
        metric = objective[0]
        if metric.startswith("test_"):
            raise UserError(f"sweep.objectives {metric!r}: searches select on the validation "
                            f"split, never on test (use {'validation_' + metric[5:]!r})")
        if metric.startswith("validation_"):
            if not has_validation(config):
                raise UserError(f"sweep.objectives {metric!r} needs a validation split: set "
                                "data.validation_fraction > 0 (or data.generated_validation)")
        elif metric in MEASURED:
            if not config.train.measure and metric != "train_wall_s":
                raise UserError(f"sweep.objectives {metric!r} is measured only with "
                                "train.measure=True")
        else:
            raise UserError(f"sweep.objectives metric {metric!r} is not a validation_* metric "
                            f"or one of {', '.join(MEASURED)}")
    check_names(sweep.sampler, sweep.pruner, len(objectives))
    for name in ("trials", "population", "workers"):
        if sweep[name] < 1:
            raise UserError(f"sweep.{name} must be >= 1, got {sweep[name]}")
    if sweep.startup_trials < 0:
        raise UserError(f"sweep.startup_trials must be >= 0, got {sweep.startup_trials}")
    if config.population:
        raise UserError("a sweep makes its own populations (sweep.population); leave the "
                        "config's `population` empty")
    return width_dims(config) if config.sweep.widths else check_space(config)


def storage_url(config: ml_collections.ConfigDict, workdir: str) -> str:
    return config.sweep.storage or os.path.join(os.path.abspath(workdir), "study.journal")


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """An RDB URL (sqlite:///, postgresql://, ...) or a journal file path."""
    if "://" in url:
        for attempt in range(5):
            try:
                return optuna.storages.RDBStorage(url, engine_kwargs=_engine_kwargs(url))
            except Exception as e:  # noqa: BLE001 - SQLAlchemy's errors are many; bad input here
                text = " ".join(str(e).split())
                # Workers starting together on a fresh database race to create its tables.
                if attempt < 4 and ("already exists" in text or "duplicate key" in text):
                    time.sleep(0.5 + attempt)
                    continue
                raise UserError(f"sweep storage {url!r}: {text[:300]}") from None
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(url))


def _engine_kwargs(url: str) -> dict:
    return {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}


def study_name(config: ml_collections.ConfigDict) -> str:
    """The same config gives the same study name on every machine sharing one storage."""
    text = json.dumps(config.to_dict(), sort_keys=True, default=str)
    return "sweep-" + hashlib.sha1(text.encode()).hexdigest()[:12]


class Sweep:
    """A study with its config, run by this process in `workdir`."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str, storage: str = "",
                 worker: int = 0):
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # the sweep prints its own lines
        self.config, self.workdir = config, os.path.abspath(workdir)
        self.dims = check_sweep(config)
        self.objectives = [tuple(o) for o in config.sweep.objectives]
        self.storage = storage or storage_url(config, workdir)
        self.study = optuna.create_study(
            storage=open_storage(self.storage), study_name=study_name(config),
            load_if_exists=True, directions=[d for _, d in self.objectives],
            # Parallel workers draw their own random streams, or they would ask alike.
            sampler=make_sampler(config.sweep.sampler, config.sweep.seed + 7919 * worker,
                                 self.dims, config.sweep.startup_trials),
            pruner=make_pruner(config.sweep.pruner, config.train.eval_every, config.train.steps))
        self.study.set_user_attr("objectives", [list(o) for o in self.objectives])
        self.study.set_user_attr("space", [list(d) for d in self.dims])
        self.host = socket.gethostname()

    # -- bookkeeping ----------------------------------------------------------------------------
    def counted(self) -> list[optuna.trial.FrozenTrial]:
        """The study's asked trials within the budget (a rare race between machines may ask
        more; enqueued ones still WAITING are not asked yet)."""
        return [t for t in self.study.get_trials(deepcopy=False)
                if t.state != TrialState.WAITING and not t.user_attrs.get("over_budget")]

    def done(self) -> list[optuna.trial.FrozenTrial]:
        return [t for t in self.counted() if t.state != TrialState.RUNNING]

    @contextlib.contextmanager
    def _claiming(self) -> Iterator[None]:
        """Local workers claim jobs one at a time: asking and locking are one step."""
        with open(os.path.join(self.workdir, "claim.lock"), "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield

    def _lock(self, directory: str):
        """The job's lock, held while this process trains it; None if another holds it."""
        path = os.path.join(self.workdir, directory + ".lock")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        f = open(path, "w")  # noqa: SIM115 - held open for the job's lifetime
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            return None
        return f

    def _orphans(self) -> list[Job]:
        """Jobs whose trials are RUNNING here but whose worker is gone (its lock is free)."""
        here = [t for t in self.study.get_trials(deepcopy=False)
                if (t.user_attrs.get("host"), t.user_attrs.get("workdir")) == (self.host,
                                                                                self.workdir)]
        orphaned = {t.user_attrs["job"] for t in here if t.state == TrialState.RUNNING}
        jobs = []
        for directory in sorted(orphaned):
            members = [t for t in here  # a population's stopped members too
                       if t.user_attrs.get("job") == directory]
            lock = self._lock(directory)
            if lock is None:
                continue
            trials = [optuna.Trial(self.study, t._trial_id) for t in
                      sorted(members, key=lambda t: t.user_attrs.get("population_index", 0))]
            for t in trials:
                t.set_user_attr("resumed", True)
            jobs.append((Job(directory, trials), lock))
        return jobs

    def _ask(self) -> list:
        """A batch of new trials (up to sweep.population), grouped into jobs by shape."""
        budget = self.config.sweep.trials - len(self.counted())
        trials = []
        for _ in range(min(budget, self.config.sweep.population)):
            trial = self.study.ask()
            suggest(trial, self.dims)
            # Counted trials numbered before this one: more than the budget if another
            # machine asked in between.
            ahead = sum(t.number < trial.number for t in self.counted())
            if ahead >= self.config.sweep.trials:  # another machine won
                trial.set_user_attr("over_budget", True)
                self.study.tell(trial, state=TrialState.FAIL)
                break
            trials.append(trial)
        masked = bool(self.config.sweep.widths)  # width NAS: any widths share one program
        groups: dict[tuple, list] = {}
        for trial in trials:
            groups.setdefault(() if masked else shape_key(trial.params), []).append(trial)
        jobs = []
        for members in groups.values():
            population = masked or self.config.sweep.population > 1
            directory = f"{'populations' if population else 'trials'}/{members[0].number}"
            lock = self._lock(directory)
            for index, trial in enumerate(members):
                trial.set_user_attr("host", self.host)
                trial.set_user_attr("workdir", self.workdir)
                trial.set_user_attr("job", directory)
                trial.set_user_attr("run_dir" if not population else "population_dir",
                                    os.path.join(self.workdir, directory))
                if population:
                    trial.set_user_attr("population_index", index)
            jobs.append((Job(directory, members), lock))
        return jobs

    def claim(self) -> list:
        with self._claiming():
            return self._orphans() or self._ask()

    def work(self, on_done=None) -> None:
        """Claims and trains jobs until the study has its trials.

        SIGTERM or Ctrl-C stops it as it stops `train`: inside a job, the job's run saves and
        raises `Preempted`; between jobs (claiming, telling the study), at the next job, whose
        trials stay RUNNING with their locks free, so the rerun claims and trains them.
        """
        with StopSignals(announce=False) as signals:
            while jobs := self.claim():
                try:
                    for job, lock in jobs:
                        signals.stop_if_received("the sweep stopped between trials; rerun "
                                                 "the same command to finish the study")
                        run_job(job, self.config, self.workdir, self.objectives, self.study)
                        lock.close()
                        if on_done is not None:
                            on_done()
                finally:
                    for _, lock in jobs:
                        lock.close()


def prepare(config: ml_collections.ConfigDict, workdir: str, storage: str = "") -> Sweep:
    """The sweep in `workdir`: checked, recorded (a rerun must bring the same config)."""
    validate(config)
    dims = check_sweep(config)
    swept_data = next((d[2] for d in dims if d[0] == "data.name"), None)
    for name in swept_data or (config.data.name,):  # every data set a trial may train on
        check_measured(apply(config, {"data.name": name}))
    os.makedirs(workdir, exist_ok=True)
    record = {"config": config.to_dict(), "storage": storage or storage_url(config, workdir)}
    path = os.path.join(workdir, RECORD)
    if os.path.exists(path):
        with open(path) as f:
            recorded = json.load(f)
        if _canonical(recorded["config"]) != _canonical(record["config"]):
            raise UserError(f"{workdir} holds a sweep of another config ({path}); use a new "
                            "--workdir or the same config")
        record["storage"] = storage or recorded["storage"]
    sweep = Sweep(config, workdir, record["storage"])  # checks before anything is written
    with open(path, "w") as f:
        json.dump(record, f, indent=2, default=str)
    return sweep


def _canonical(block: dict) -> str:
    return json.dumps(json.loads(json.dumps(block, default=str)), sort_keys=True)


def recorded(workdir: str) -> dict:
    """The config and storage `prepare` recorded in `workdir`."""
    path = os.path.join(workdir, RECORD)
    if not os.path.exists(path):
        raise UserError(f"{workdir} holds no {RECORD}: not a sweep directory")
    with open(path) as f:
        return json.load(f)


def load(workdir: str, worker: int = 0) -> Sweep:
    """The sweep recorded in `workdir` (for workers and `--status`)."""
    record = recorded(workdir)
    return Sweep(ml_collections.ConfigDict(record["config"]), workdir, record["storage"], worker)


def run_sweep(config: ml_collections.ConfigDict, workdir: str, *, storage: str = "",
              workers: int | None = None, progress: bool = True) -> optuna.Study:
    """Runs (or resumes) the sweep to `sweep.trials` trials; returns the study.

    `workers` > 1 starts that many worker processes on this machine against the one study
    (default: `sweep.workers`); this process then only watches.
    """
    sweep = prepare(config, workdir, storage)
    total = config.sweep.trials
    bar = tqdm(total=total, initial=min(len(sweep.done()), total), desc="sweep", unit="trial",
               disable=not progress, dynamic_ncols=True)

    def update():
        done = sweep.done()
        bar.n = min(len(done), total)
        best = _best(sweep, done)
        if best is not None:
            bar.set_postfix({sweep.objectives[0][0]: f"{best:.4g}"})
        bar.refresh()

    try:
        count = workers or config.sweep.workers
        if count > 1:
            _run_workers(sweep, count, update)
        else:
            sweep.work(on_done=update)
        update()
    finally:
        bar.close()
    check_some_succeeded(sweep)
    return sweep.study


def check_some_succeeded(sweep: Sweep) -> None:
    """A study whose every trial failed is an error, not a result: the reason (the first
    trial's, one line) reaches the terminal rather than only study.journal."""
    done = sweep.done()
    if not done or any(t.state != TrialState.FAIL for t in done):
        return
    reasons = [t.user_attrs["error"] for t in done if t.user_attrs.get("error")]
    reason = " ".join(reasons[0].split()) if reasons else "no reason recorded"
    raise UserError(f"all {len(done)} trials of the sweep failed; the first: {reason}")


def _best(sweep: Sweep, done: list) -> float | None:
    values = [t.values[0] for t in done if t.state == TrialState.COMPLETE]
    if not values:
        return None
    return max(values) if sweep.objectives[0][1] == "maximize" else min(values)


def _run_workers(sweep: Sweep, count: int, update) -> None:
    """Starts `count` workers and watches them. A stop signal here is passed on as SIGTERM
    (save and stop; never a second Ctrl-C's "stop at once", should the terminal have sent them
    the first itself); once they have saved, `Preempted`."""
    procs = [subprocess.Popen([sys.executable, "-m", "jaxopt_lab.tune.sweep", sweep.workdir,
                               str(index + 1)]) for index in range(count)]
    try:
        with StopSignals(announce=False) as signals:
            passed_on = False
            while any(p.poll() is None for p in procs):
                time.sleep(1.0)
                update()
                if signals.received and not passed_on:
                    for p in procs:
                        if p.poll() is None:
                            p.send_signal(signal.SIGTERM)
                    passed_on = True
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
    signals.stop_if_received("the sweep's workers saved their trials and stopped; rerun the "
                             "same command to finish the study")
    failed = [p.returncode for p in procs if p.returncode]
    if failed:
        raise UserError(f"{len(failed)} of {count} sweep workers failed (exit codes {failed}); "
                        "rerun the same command to finish the study")


def _worker_main(workdir: str, worker: int) -> int:
    try:
        load(workdir, worker).work()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Preempted as e:  # the trial's checkpoint is saved; a rerun resumes it
        print(e, file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:  # Ctrl-C before a run's handlers were installed: nothing to save
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1], int(sys.argv[2])))
