"""`train_and_evaluate`: the one entry point that trains a config, with the one multi-run step a
plain training needs — a distillation teacher named by `teacher_config` is trained first.

The teacher is trained into `techniques.distill.teacher` (or WORKDIR/teacher) unless a finished
run is there (a half-trained one resumes); the student's config then names that directory, so
config.json records it and `load_run` and a resume find it.
"""

from __future__ import annotations

import os

import jax
import ml_collections

from jaxopt_lab.compose import TECHNIQUES, load_config
from jaxopt_lab.run.loop import MemberStopper, train_run

TEACHER_SUBDIR = "teacher"  # where a teacher trained first lives when no directory is named


def teacher_directory(block: ml_collections.ConfigDict, workdir: str) -> str:
    """The teacher's run directory: `teacher` as given, else (a teacher trained first from
    `teacher_config`) `workdir`/teacher."""
    return block.teacher or os.path.join(workdir, TEACHER_SUBDIR)


def train_teacher_first(config: ml_collections.ConfigDict, workdir: str,
                        techniques=TECHNIQUES) -> ml_collections.ConfigDict:
    """Trains the teacher from `techniques.distill.teacher_config` into its directory unless a
    finished run (summary.json) is there; returns `config` with the directory recorded as
    `teacher`. Every process calls this, as they train together."""
    block = config.techniques.get("distill")
    if block is None or not block.teacher_config:
        return config
    directory = teacher_directory(block, workdir)
    if not os.path.exists(os.path.join(directory, "summary.json")):
        teacher_config = load_config(block.teacher_config, list(block.teacher_overrides),
                                     techniques)
        if jax.process_index() == 0:
            print(f"distill: training the teacher ({block.teacher_config}) in {directory} first",
                  flush=True)
        train_and_evaluate(teacher_config, directory, techniques=techniques)
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.techniques.distill.teacher = directory
    return config


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, model=None,
                       dataset=None, loss_fn=None, eval_fn=None,
                       hparams: dict[str, float] | None = None, reducer=None, tx=None,
                       stop_members: MemberStopper | None = None,
                       techniques=TECHNIQUES) -> dict:
    """Trains `config` in `workdir` (resuming if it holds a checkpoint); returns the summary.

    Args:
      config: a validated config (`jaxopt_lab.load_config`).
      workdir: the run directory.
      model: a Flax linen module of your own, called as `model.apply(variables, x, train=...)`
        (a module without a `train` argument is called without it); default: `config.model`.
      dataset: a `data.sources.Dataset`, or a mapping of split names to TFDS/grain data sources
        (`as_dataset`); default: `config.data`.
      loss_fn: `loss_fn(params, model_state, batch, rng, hparams) -> (loss, aux)`, aux holding
        at least {"metrics": {...}, "model_state": ...}; default: the data set's task. Give it
        a keyword `apply_fn` and call that instead of your module's apply: it is the composed
        model's (with quantization, say); a loss without one is refused where a technique
        changes the model.
      eval_fn: `eval_fn(params, model_state, batch) -> {metric: per-example values}`; default:
        the data set's task's evaluation.
      hparams: per-trial scalars your loss reads from its `hparams` argument (a population may
        vary them by name).
      reducer: a `core.step.Reducer` of your own (gradient communication); default: the
        config's `techniques.compress`, an exact all-reduce unless it names a compressor.
      tx: an optax transformation of your own (`prune.wrap`ped or not); default: the config's
        `optim` block. Techniques applied from Python (a `quantize.wrap`ped model, a
        `distill.wrap`ped loss, a `prune.wrap`ped tx, a compressing reducer) are recorded in
        summary.json like the config's; the config may not apply one a second time.
      stop_members: called at every evaluation before the last step with (step, per-member
        metrics; one dict for a single run); the members it returns are stopped (a single run
        returning [0] ends there, checkpointed, its summary's `stopped_at` set).
      techniques: what may apply, in seam order (`jaxopt_lab.TECHNIQUES` and your own).
    Pass the same objects again to resume.
    """
    config = train_teacher_first(config, workdir, techniques)
    return train_run(config, workdir, model=model, dataset=dataset, loss_fn=loss_fn,
                     eval_fn=eval_fn, hparams=hparams, reducer=reducer, tx=tx,
                     stop_members=stop_members, techniques=techniques).summary
