"""Feature hints (Romero et al. 2015, "FitNets: Hints for Thin Deep Nets"): a student layer's
activation, through a learned linear map over its channels, regresses a teacher layer's.

Pairs name layers by module path ("Conv_1"): the student's loss captures them
(`core.tasks.make_task(capture=...)`), the teacher's forward captures its own. The maps are params
of their own subtree, params[HINTS]["<pair index>"]["projection"] of shape [student channels,
teacher channels]: the optimizer trains them, checkpoints keep them, and `core.state.model_params`
drops them from what the model exports. Every axis but the last must match (a conv's length).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from jaxopt_lab.core.state import HINTS
from jaxopt_lab.core.tasks import apply_model
from jaxopt_lab.errors import UserError

__all__ = ["HINTS", "capture_patterns", "check_features", "hint_loss", "init_hints"]


def check_features(features: Sequence[Sequence[str]], weight: float
                   ) -> tuple[tuple[str, str], ...]:
    """`features` as (student layer, teacher layer) pairs; one line naming a bad one."""
    pairs = []
    for pair in features or ():
        if (isinstance(pair, str) or len(pair) != 2
                or not all(isinstance(p, str) and p for p in pair)):
            raise UserError(f"distill features: {pair!r} is not a (student layer, teacher layer) "
                            "pair of module paths, e.g. ('Conv_1', 'Conv_1')")
        pairs.append((pair[0], pair[1]))
    if isinstance(weight, bool) or not (isinstance(weight, (int, float)) and weight >= 0):
        raise UserError(f"distill feature_weight={weight!r} must be a number >= 0")
    return tuple(pairs)


def capture_patterns(layers: Sequence[str]) -> list[str]:
    """The capture regexes that match exactly these module paths."""
    return [re.escape(layer) for layer in layers]


def init_hints(student, sample_x, teacher_forward: Callable,
               features: Sequence[tuple[str, str]]) -> Callable[[jax.Array], dict]:
    """`key -> {HINTS: maps}`, the maps shaped from both models' activations on `sample_x`
    (traced, not run)."""
    variables = jax.eval_shape(lambda x: student.init(
        {"params": jax.random.key(0), "dropout": jax.random.key(1)}, x), sample_x)
    state = {k: v for k, v in variables.items() if k != "params"}
    students = [s for s, _ in features]
    _, _, captured = jax.eval_shape(lambda p, x: apply_model(
        student, p, state, x, None, train=False, capture=capture_patterns(students)),
        variables["params"], sample_x)
    _, taught = jax.eval_shape(teacher_forward, sample_x)
    shapes = []
    for s, t in features:
        for layer, found, who in ((s, captured, "student"), (t, taught, "teacher")):
            if layer not in found:
                raise UserError(f"distill features: the {who} has no layer {layer!r} (a module "
                                "path, e.g. 'Conv_1' or 'Block_0/Dense_1')")
        s_shape, t_shape = captured[s].shape, taught[t].shape
        if s_shape[:-1] != t_shape[:-1]:
            raise UserError(f"distill features: student {s!r} {tuple(s_shape[1:])} and teacher "
                            f"{t!r} {tuple(t_shape[1:])} differ in more than the channel axis")
        shapes.append((s_shape[-1], t_shape[-1]))

    def init(key: jax.Array) -> dict:
        keys = jax.random.split(key, len(shapes))
        return {HINTS: {str(i): {"projection": jax.nn.initializers.lecun_normal()(k, shape)}
                        for i, (k, shape) in enumerate(zip(keys, shapes, strict=True))}}

    return init


def hint_loss(params: dict, student_features: dict, teacher_features: dict,
              features: Sequence[tuple[str, str]]) -> jax.Array:
    """The mean over pairs of the mean squared error between the mapped student activation and
    the teacher's."""
    total = 0.0
    for i, (s, t) in enumerate(features):
        if s not in student_features:
            raise UserError(f"distill features: the student's loss captured no {s!r} (build "
                            "the loss with capture=[...] naming it)")
        mapped = student_features[s] @ params[HINTS][str(i)]["projection"]
        total = total + jnp.mean(jnp.square(mapped - teacher_features[t]))
    return total / len(features)
