"""`jaxopt-lab optimize --config X --workdir D`: a trained baseline and every candidate built
from it, evaluated alike, in one report.

D/baseline is the model as the config trains it (or `baseline=RUN`, a finished run), profiled
into D/profile (`profile/profile_run.py`). Each recipe
(`optimize/candidates.py`) is a run directory D/<name> trained by the ordinary loop with the
recipe's overrides; its deployable forms (shrunk: D/<name>/shrunk_<pct>; int8: .../quantized)
are made by the techniques' own conversions. Every step skips what a previous invocation
finished, so rerunning after a kill resumes. Candidates are compared on what they deploy:
validation and test accuracy and size from the summary of the directory that holds that form,
latencies timed side by side here (`profile/latency.py`). With `optimize.runtime` an ONNX runtime,
each deployed form is exported and measured in it instead: accuracies from the runtime's own
outputs, latencies beside the baseline in XLA float32 and in the runtime (`optimize/runtime.py`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

from jaxopt_lab.compose.config import load_config
from jaxopt_lab.core.config import has_validation
from jaxopt_lab.core.interrupt import StopSignals
from jaxopt_lab.core.state import sample_input
from jaxopt_lab.errors import UserError
from jaxopt_lab.export import deployed_form
from jaxopt_lab.optimize.candidates import (
    Recipe,
    calibration_batches,
    check_block,
    quantize_scheme,
    recipes,
)
from jaxopt_lab.optimize.runtime import measure_in_runtime, runtime_baseline_name
from jaxopt_lab.profile.latency import compare_latency
from jaxopt_lab.profile.pareto import write_report
from jaxopt_lab.profile.profile_run import profile_config
from jaxopt_lab.run.build import load_run
from jaxopt_lab.workflows.convert import quantize_run
from jaxopt_lab.workflows.shrink import shrink_run
from jaxopt_lab.workflows.train import train_and_evaluate


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One deployable model: where its numbers are recorded and where its deployed form lives."""

    name: str
    techniques: tuple[str, ...]
    run_dir: str  # the training run
    member: int | None  # its member, for a population run that was not shrunk
    deploy_dir: str  # the run directory whose model (or serving form) is deployed
    serving: bool  # deployed as deploy_dir/quantized's int8 serving form
    summary_path: str  # the summary.json holding its accuracy and size
    bytes_key: str  # the size field there (an encoding's, for unstructured sparsity)


def optimize(config_path: str, workdir: str, overrides: tuple[str, ...] = (), *,
             baseline: str | None = None, max_accuracy_drop: float | None = None,
             progress: bool = True) -> dict:
    """Trains (or resumes, or takes) the baseline and every candidate; writes D/report.md,
    D/report.json and D/pareto.png; returns the report."""
    config = load_config(config_path, overrides)
    if max_accuracy_drop is not None:
        with config.unlocked():
            config.optimize.max_accuracy_drop = float(max_accuracy_drop)
    check_block(config.optimize)
    if not has_validation(config):
        raise UserError(f"optimize picks candidates on validation accuracy, and {config_path} "
                        "holds out no validation split: add --config.data.validation_fraction=0.1")
    if config.population:
        raise UserError("optimize starts from one baseline run: the config has a population "
                        "(set --config.population=())")
    os.makedirs(workdir, exist_ok=True)
    _same_runtime(workdir, config.optimize.runtime)
    with StopSignals(announce=False) as signals:
        return _pipeline(config, config_path, workdir, overrides, baseline, progress, signals)


def _same_runtime(workdir: str, runtime: str) -> None:
    """Records the runtime a pipeline directory is made for; refuses another one there (its int8
    candidates were trained and converted for the first)."""
    path = os.path.join(workdir, "optimize.json")
    if os.path.exists(path):
        with open(path) as f:
            made_for = json.load(f)["runtime"]
        if made_for != runtime:
            raise UserError(f"{workdir} was made for optimize.runtime={made_for} (its int8 "
                            f"candidates are trained and converted for it); for {runtime}, use "
                            "another --workdir")
        return
    with open(path, "w") as f:
        json.dump({"runtime": runtime}, f)


def _stop_after(signals: StopSignals, done: str) -> None:
    """Between the pipeline's steps: a SIGTERM or Ctrl-C that came outside a training run
    (profiling, converting, timing) or at a run's very end stops here, as `train` stops."""
    signals.stop_if_received(f"optimize stopped after {done}; rerun the same command to resume")


def _pipeline(config, config_path: str, workdir: str, overrides: tuple[str, ...],
              baseline: str | None, progress: bool, signals: StopSignals) -> dict:
    """`optimize`'s steps, each followed by a look at `signals` (`_stop_after`)."""
    baseline_dir = baseline or os.path.join(workdir, "baseline")
    if baseline:
        if not os.path.exists(os.path.join(baseline, "summary.json")):
            raise UserError(f"--baseline {baseline}: holds no summary.json (not a finished run)")
    else:
        _train(config, baseline_dir, "baseline", progress)
        _stop_after(signals, "training the baseline")
    if "validation_accuracy" not in _fields(os.path.join(baseline_dir, "summary.json"), None):
        raise UserError(f"{baseline_dir} has no validation_accuracy: optimize compares "
                        "classifiers (a population or a regression run cannot be its baseline)")
    profile_path = os.path.join(workdir, "profile", "profile.json")
    if not os.path.exists(profile_path):  # where the baseline's time and bytes go
        profile_config(config, workdir, progress=progress)
        _stop_after(signals, "profiling the baseline")
    with open(profile_path) as f:
        profile = json.load(f)
    plan = recipes(config, baseline_dir)
    candidates, failures = [], {}
    for i, recipe in enumerate(plan, 1):
        run_dir = os.path.join(workdir, recipe.name)
        _say(progress, f"[{i}/{len(plan)}] {recipe.name}: {' + '.join(recipe.techniques)}")
        try:
            _train(load_config(config_path, (*overrides, *recipe.overrides)), run_dir,
                   recipe.name, progress)
            candidates += _deployables(recipe, run_dir, config.optimize.runtime)
        except UserError as e:  # a technique that does not fit this model: report, go on
            failures[recipe.name] = str(e)
            _say(progress, f"{recipe.name} failed: {e}")
        _stop_after(signals, recipe.name)
    runtime, served = config.optimize.runtime, None
    _say(progress, f"timing {len(candidates) + 1} models side by side in {runtime}")
    if runtime == "xla":
        forms, sample_x = _forms(baseline_dir, candidates)
        measured = compare_latency(forms, sample_x, progress=progress)
    else:
        measured = measure_in_runtime(runtime, baseline_dir, candidates,
                                      os.path.join(workdir, "deploy", runtime), progress=progress)
        name = runtime_baseline_name(runtime)
        served = {"runtime": measured.pop("runtime"),
                  "baseline": {**_baseline_row(baseline_dir, measured.pop(name)), "name": name}}
    rows = [_row(c, measured[c.name]) for c in candidates]
    base = _baseline_row(baseline_dir, measured["baseline"])
    return write_report(workdir, base, rows, failures, config.optimize,
                        recipes={r.name: list(r.overrides) for r in plan},
                        profile={"path": profile_path, **_profile_brief(profile)}, served=served)


def _profile_brief(profile: dict) -> dict:
    """What the report repeats of the baseline's profile: where the FLOPs are, how busy the
    device is, how long the step waits for data."""
    total = sum(layer["flops_per_example"] for layer in profile["layers"]) or 1
    return {"flops_share": {layer["layer"]: layer["flops_per_example"] / total
                            for layer in profile["layers"]},
            "mfu": profile["mfu"],
            "data_wait_fraction": {feed: t["data_wait_fraction"]
                                   for feed, t in profile["feeds"].items()}}


def _say(progress: bool, message: str) -> None:
    if progress:
        print(f"optimize: {message}", flush=True)


def _train(config, run_dir: str, name: str, progress: bool) -> None:
    """The run in `run_dir`, unless it finished before (summary.json); a partial one resumes."""
    if os.path.exists(os.path.join(run_dir, "summary.json")):
        _say(progress, f"{name}: finished before, in {run_dir}")
        return
    with config.unlocked():
        config.train.progress = progress and config.train.progress
    train_and_evaluate(config, run_dir)


def _deployables(recipe: Recipe, run_dir: str, runtime: str) -> list[Candidate]:
    """The candidates of one trained recipe, their conversions run where not done before."""
    members = list(enumerate(recipe.sparsities)) or [(None, None)]
    out = []
    for member, sparsity in members:
        name = recipe.name if sparsity is None else f"{recipe.name}_{round(100 * sparsity)}"
        deploy_dir, summary = run_dir, os.path.join(run_dir, "summary.json")
        if recipe.shrink:
            deploy_dir = os.path.join(run_dir, f"shrunk_{round(100 * sparsity)}")
            if not os.path.exists(os.path.join(deploy_dir, "summary.json")):
                shutil.rmtree(deploy_dir, ignore_errors=True)  # a shrink cut short: redo it
                shrink_run(run_dir, member=member, out=deploy_dir)
            summary = os.path.join(deploy_dir, "summary.json")
        if recipe.quantize:
            summary = os.path.join(deploy_dir, "quantized", "summary.json")
            if not os.path.exists(summary):
                quantize_run(deploy_dir, scheme=quantize_scheme(runtime),
                             calibrate_batches=calibration_batches(runtime))
        bytes_key = "model_bytes"
        if recipe.name == "unstructured":  # stored as the smaller of its compact encodings
            fields = _fields(summary, member)
            bytes_key = min(("model_bytes_bitmask", "model_bytes_relative_index"),
                            key=lambda k: fields[k])
        kept_member = None if recipe.shrink else member
        out.append(Candidate(name, recipe.techniques, run_dir, kept_member, deploy_dir,
                             recipe.quantize, summary, bytes_key))
    return out


def _fields(summary_path: str, member: int | None) -> dict:
    """A summary's fields; a population member's own ones over the run's shared ones."""
    with open(summary_path) as f:
        summary = json.load(f)
    if member is None:
        return summary
    return {**summary, **summary["members"][member]}


def _forms(baseline_dir: str, candidates: list[Candidate]) -> tuple[dict, object]:
    """{name: (apply, variables)} of what the baseline and each candidate deploy, and a sample
    input; each run directory is loaded once (a population's members share theirs)."""
    runs = {}

    def run_of(run_dir: str):
        if run_dir not in runs:
            runs[run_dir] = load_run(run_dir)
        return runs[run_dir]

    forms = {"baseline": deployed_form(run_of(baseline_dir), baseline_dir, False)[:2]}
    for c in candidates:
        forms[c.name] = deployed_form(run_of(c.deploy_dir), c.deploy_dir, c.serving, c.member)[:2]
    return forms, sample_input(run_of(baseline_dir).dataset)


def _row(candidate: Candidate, latency: dict) -> dict:
    """A candidate's report entry: its recorded numbers, and the latencies timed here."""
    fields = _fields(candidate.summary_path, candidate.member)
    trained = _fields(os.path.join(candidate.run_dir, "summary.json"), None)
    deployed = _fields(os.path.join(candidate.deploy_dir, "summary.json"), None)
    return {
        "name": candidate.name,
        "techniques": list(candidate.techniques),
        "validation_accuracy": fields["validation_accuracy"],
        "test_accuracy": fields["test_accuracy"],
        "model_bytes": fields[candidate.bytes_key],
        **latency,
        "flops": deployed["flops_per_example"],
        "train_wall_s": trained["train_wall_s"],
        "run_dir": candidate.deploy_dir,
        "member": candidate.member,
        "source": {"summary": candidate.summary_path, "member": candidate.member,
                   "model_bytes_key": candidate.bytes_key},
    }


def _baseline_row(run_dir: str, latency: dict) -> dict:
    fields = _fields(os.path.join(run_dir, "summary.json"), None)
    return {"name": "baseline", "techniques": [],
            "validation_accuracy": fields["validation_accuracy"],
            "test_accuracy": fields["test_accuracy"], "model_bytes": fields["model_bytes"],
            **latency, "flops": fields["flops_per_example"],
            "train_wall_s": fields["train_wall_s"], "run_dir": run_dir, "member": None}
