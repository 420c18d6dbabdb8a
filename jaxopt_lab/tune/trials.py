"""Running a sweep's jobs: one trial in its own run directory, or a batch of trials that differ
only in values as one vmapped population in one run directory (with `sweep.widths`, a batch of
any widths as one width-masked population: `tune/widths.py`). Either way the training loop
owns the directory, so a killed job resumes from its own checkpoint when run again.

Results go back to the study: every measured field as a user attribute of the trial, the
objectives as its values, the first objective at each evaluation as its intermediate values
(which the pruner reads to stop a trial, or a population's member, early).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import ml_collections
import optuna
from optuna.trial import TrialState

from jaxopt_lab.compose import TECHNIQUES, prepare_dataset
from jaxopt_lab.compose.config import validate
from jaxopt_lab.core.optim import INJECTED
from jaxopt_lab.core.population import STATE_KEYS
from jaxopt_lab.core.tasks import LABEL_SMOOTHING
from jaxopt_lab.errors import UserError
from jaxopt_lab.run.loop import TrainingDiverged
from jaxopt_lab.techniques import distill
from jaxopt_lab.tune import widths
from jaxopt_lab.tune.space import apply, config_value
from jaxopt_lab.workflows.train import train_and_evaluate

# Keys whose values live in the TrainState: trials differing only in these share one program.
VALUE_KEYS = frozenset({*STATE_KEYS, *INJECTED, *(k for t in TECHNIQUES for k in t.injected),
                        LABEL_SMOOTHING, distill.TEMPERATURE, distill.ALPHA})
MEASURED = ("latency_ms_batch1", "latency_ms_batch256", "num_params", "model_bytes",
            "flops_per_example", "train_wall_s")
# What each task's evaluation measures on a split (the keys of core/tasks.py's eval_fn; the
# summary names them `<split>_<metric>`): what a `validation_*` objective may name. Pinned
# against the tasks themselves by tests/test_risky.py.
TASK_METRICS = {"classification": ("loss", "accuracy"), "regression": ("loss", "mse"),
                "language_model": ("loss", "bits_per_char", "accuracy")}


@dataclasses.dataclass
class Job:
    """Trials run together: one (a run of its own) or several (a population)."""

    directory: str  # relative to the sweep's workdir: trials/N or populations/N
    trials: list[optuna.Trial]

    @property
    def is_population(self) -> bool:
        return self.directory.startswith("populations/")


def shape_key(params: dict[str, Any]) -> tuple:
    """What must be equal for trials to share a compiled program: every non-value param."""
    return tuple(sorted((k, v) for k, v in params.items() if k not in VALUE_KEYS))


def check_measured(config: ml_collections.ConfigDict) -> None:
    """Each `validation_*` objective names a metric the task of the config's data set evaluates
    (a misspelled `validation_acc` would otherwise train every trial fully and fail it at the
    end). The data set is read here once, as each trial reads it, to learn its task.

    Raises:
      UserError: one line naming the objective and what the run measures.
    """
    named = [m for m, _ in config.sweep.objectives if m.startswith("validation_")]
    if not named:
        return
    task = prepare_dataset(config).task
    measured = [f"validation_{m}" for m in TASK_METRICS.get(task, ())]
    for metric in named:
        if metric not in measured:
            raise UserError(f"sweep.objectives {metric!r} is not measured: data set "
                            f"{config.data.name!r} ({task}) gives {', '.join(measured)}; "
                            f"the run also measures {', '.join(MEASURED)}")


def job_config(base: ml_collections.ConfigDict, trials: Sequence[optuna.Trial],
               population: bool) -> ml_collections.ConfigDict:
    """The run's config: the base with the trials' shape params, and for a population each
    member's values (a member without a conditional key keeps the base config's value)."""
    params = [t.params for t in trials]
    config = apply(base, dict(shape_key(params[0])))
    for values in params:
        _check_warmup(apply(config, values))
    with config.unlocked():
        config.train.progress = False
        if population:
            keys = sorted({k for p in params for k in p if k in VALUE_KEYS})
            columns = [(k, tuple(p.get(k, config_value(base, k)) for p in params)) for k in keys]
            config.population = tuple(columns) or (("seed", (base.seed,) * len(params)),)
        else:
            config = apply(config, params[0])
            config.train.progress = False
    validate(config)
    return config


def _check_warmup(config: ml_collections.ConfigDict) -> None:
    """A sampled warm-up longer than the run is refused for the trial (which then fails with
    this line), not only warned about as a config's is: the sampler would learn from a value
    that never warmed up. `check_space` refuses such a range before the first trial; this
    catches what it cannot see (train.steps swept too)."""
    optim, steps = config.optim, config.train.steps
    if optim.schedule == "warmup_cosine" and optim.warmup_steps > steps:
        raise UserError(f"optim.warmup_steps={optim.warmup_steps} exceeds this trial's "
                        f"train.steps={steps}: the learning rate would never reach optim.lr")


def run_job(job: Job, base: ml_collections.ConfigDict, workdir: str,
            objectives: Sequence[tuple[str, str]], study: optuna.Study) -> None:
    """Trains the job (resuming its directory) and tells the study each trial's outcome."""
    run_dir = f"{workdir}/{job.directory}"
    first_metric = objectives[0][0]
    states = {t.number: t.state for t in study.get_trials(deepcopy=False)}
    # A resumed population's members already stopped (and told) before the crash.
    pruned = {i for i, t in enumerate(job.trials) if states[t.number] != TrialState.RUNNING}

    def stop(step: int, evaluations: list[dict]) -> list[int]:
        stopped = []
        for i, (trial, record) in enumerate(zip(job.trials, evaluations, strict=True)):
            if i in pruned or first_metric not in record:
                continue
            trial.report(float(record[first_metric]), step)
            if trial.should_prune():
                pruned.add(i)
                stopped.append(i)
                _set_attrs(trial, record)
                study.tell(trial, state=TrialState.PRUNED)
        return stopped

    stop_members = stop if len(objectives) == 1 else None  # Optuna prunes on one objective
    try:
        if base.sweep.widths:
            summary = widths.train_job(base, job.trials, run_dir, stop_members)
        else:
            config = job_config(base, job.trials, job.is_population)
            summary = train_and_evaluate(config, run_dir, stop_members=stop_members)
    except (TrainingDiverged, UserError) as e:
        for i, trial in enumerate(job.trials):
            if i not in pruned:
                trial.set_user_attr("error", str(e))
                study.tell(trial, state=TrialState.FAIL)
        return
    members = summary.get("members") or [summary]
    for i, (trial, member) in enumerate(zip(job.trials, members, strict=True)):
        if i in pruned:
            continue
        # The run's measurements and the member's own metrics and technique counts (sparsity…)
        record = {**summary, **member}
        _set_attrs(trial, record)
        if not job.is_population and "stopped_at" in summary:
            study.tell(trial, state=TrialState.PRUNED)
            continue
        missing = [m for m, _ in objectives if not _finite(record.get(m))]
        if missing:
            trial.set_user_attr("error", f"objective(s) {missing} not measured by the run")
            study.tell(trial, state=TrialState.FAIL)
        else:
            study.tell(trial, [float(record[m]) for m, _ in objectives])


def _numbers(record: dict) -> dict:
    return {k: v for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _set_attrs(trial: optuna.Trial, record: dict) -> None:
    for key, value in _numbers(record).items():
        trial.set_user_attr(key, value)
