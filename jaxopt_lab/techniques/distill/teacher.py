"""Teachers: a frozen `x -> logits` (and named activations) from a loaded run or a
(module, variables) pair. (A teacher trained first is a workflow: `workflows/train.py`.)

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


def module_and_variables(teacher: Any, member: int = -1) -> tuple[Any, dict]:
    """(module, variables) of a teacher given as a pair or a loaded run; for a population run,
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
        raise UserError("distill: teacher must be a Run (jaxopt_lab.load_run) or a "
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


def describe_teacher(teacher: Any, member: int = -1) -> dict:
    """summary.json's teacher fields: where it comes from (a loaded run's directory), its
    parameter count beside the student's and its test accuracy (from its own summary, where it
    has one; a population's member `member`)."""
    _, variables = module_and_variables(teacher, member)
    workdir = getattr(teacher, "workdir", None)
    fields = {"teacher": workdir or "(module, variables) from Python",
              "teacher_params": sum(int(x.size) for x in jax.tree.leaves(variables["params"]))}
    path = os.path.join(workdir, "summary.json") if workdir else ""
    if os.path.exists(path):
        with open(path) as f:
            summary = json.load(f)
        if "members" in summary and 0 <= member < len(summary["members"]):
            summary = summary["members"][member]
        if summary.get("test_accuracy") is not None:
            fields["teacher_test_accuracy"] = summary["test_accuracy"]
    return fields
