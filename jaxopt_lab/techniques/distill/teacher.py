"""Teachers: a frozen `x -> logits` (and named activations) from a run directory or a
(module, variables) pair, and a teacher trained first when its directory holds none.

A teacher's variables pass through `stop_gradient` and are closed over by the student's step:
constants of the compiled program, never in the student's TrainState.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax

from jaxopt_lab.core.state import model_params
from jaxopt_lab.core.tasks import apply_model
from jaxopt_lab.errors import UserError

TEACHER_SUBDIR = "teacher"  # where a teacher trained first lives when no directory is named


def module_and_variables(teacher: Any, member: int = -1) -> tuple[Any, dict]:
    """(module, variables) of a teacher given as a pair or a `core.run.Run`; for a population run,
    member `member`'s."""
    if hasattr(teacher, "experiment") and hasattr(teacher, "state"):
        state = teacher.state
        if teacher.members:
            if not 0 <= member < len(teacher.members):
                raise UserError(f"distill: the teacher run is a population of "
                                f"{len(teacher.members)}; set teacher_member to one of 0.."
                                f"{len(teacher.members) - 1}")
            state = jax.tree.map(lambda a: a[member], state)
        return teacher.experiment.model, {"params": model_params(state.params),
                                          **state.model_state}
    try:
        module, variables = teacher
    except (TypeError, ValueError):
        raise UserError("distill: teacher must be a Run (core.run.load_run) or a "
                        "(module, variables) pair") from None
    return module, dict(variables)


def teacher_fn(teacher: Any, member: int = -1, capture: Sequence[str] = ()) -> Callable:
    """`x -> (logits, intermediates)` of the teacher in inference mode, with no gradient reaching
    its variables; `intermediates` holds the outputs of the modules `capture` names."""
    module, variables = module_and_variables(teacher, member)
    variables = jax.tree.map(jax.lax.stop_gradient, variables)
    params = variables["params"]
    state = {k: v for k, v in variables.items() if k != "params"}

    def forward(x):
        outputs, _, intermediates = apply_model(module, params, state, x, None, train=False,
                                                capture=capture)
        return jax.lax.stop_gradient((outputs, intermediates))

    return forward


def describe_teacher(teacher: Any, workdir: str, member: int = -1) -> dict:
    """summary.json's teacher fields: its test accuracy (from its own summary in `workdir`, where
    it has one; a population's member `member`) and its parameter count, beside the student's."""
    _, variables = module_and_variables(teacher, member)
    fields = {"teacher_params": sum(int(x.size) for x in jax.tree.leaves(variables["params"]))}
    path = os.path.join(workdir, "summary.json")
    if os.path.exists(path):
        with open(path) as f:
            summary = json.load(f)
        if "members" in summary and 0 <= member < len(summary["members"]):
            summary = summary["members"][member]
        if summary.get("test_accuracy") is not None:
            fields["teacher_test_accuracy"] = summary["test_accuracy"]
    return fields


def teacher_directory(block, workdir: str) -> str:
    """The teacher's run directory: `teacher` as given, else (a teacher trained first from
    `teacher_config`) `workdir`/teacher."""
    return block.teacher or os.path.join(workdir, TEACHER_SUBDIR)


def train_teacher_first(config, workdir: str):
    """Trains the teacher from `techniques.distill.teacher_config` into its directory unless a
    finished run (summary.json) is there; a half-trained one resumes. Returns `config` with the
    directory recorded as `teacher`, so config.json names it. Every process calls this, as they
    train together."""
    block = config.techniques.distill
    if not block.teacher_config:
        return config
    directory = teacher_directory(block, workdir)
    if not os.path.exists(os.path.join(directory, "summary.json")):
        from jaxopt_lab.core.config import load_config  # the loop imports this module
        from jaxopt_lab.core.loop import train_and_evaluate

        teacher_config = load_config(block.teacher_config, list(block.teacher_overrides))
        if jax.process_index() == 0:
            print(f"distill: training the teacher ({block.teacher_config}) in {directory} first",
                  flush=True)
        train_and_evaluate(teacher_config, directory)
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.techniques.distill.teacher = directory
    return config
