"""Soft-target distillation at the loss seam, with teacher and student modules defined here."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxopt_lab.core.tasks import classification
from jaxopt_lab.errors import UserError
from jaxopt_lab.techniques import distill


class Teacher(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(4)(nn.relu(nn.Dense(64)(x)))


class Student(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(4)(x)


X = jax.random.normal(jax.random.key(0), (256, 8))
TEACHER = Teacher()
TEACHER_VARIABLES = TEACHER.init(jax.random.key(1), X)
LABELS = jnp.argmax(TEACHER.apply(TEACHER_VARIABLES, X), -1)
BATCH = {"x": X, "label": LABELS}
STUDENT = Student()


def _student_loss(**options):
    hard = classification(STUDENT).loss_fn
    return distill.wrap(hard, (TEACHER, TEACHER_VARIABLES), **options)


def test_soft_loss_is_zero_for_the_teachers_own_logits_and_kl_differs_from_ce_by_entropy():
    z = jax.random.normal(jax.random.key(2), (16, 4))
    assert float(distill.soft_loss(z, z, 2.0, "kl")) == pytest.approx(0.0, abs=1e-6)
    p = jax.nn.softmax(z / 2.0)
    entropy = -jnp.mean(jnp.sum(p * jnp.log(p), -1))
    assert float(distill.soft_loss(z, z, 2.0, "cross_entropy")) == pytest.approx(
        4.0 * float(entropy), rel=1e-5)  # T² × the teacher's entropy


def test_alpha_weighs_soft_against_hard_and_metrics_say_both():
    params = STUDENT.init(jax.random.key(3), X)["params"]
    key = jax.random.key(4)
    for alpha in (0.0, 0.3, 1.0):
        loss, aux = _student_loss(alpha=alpha)(params, {}, BATCH, key, {})
        m = aux["metrics"]
        assert float(loss) == pytest.approx(
            alpha * float(m["distill_soft_loss"]) + (1 - alpha) * float(m["distill_hard_loss"]),
            rel=1e-6)


def test_hparams_override_temperature_and_alpha_per_trial():
    params = STUDENT.init(jax.random.key(3), X)["params"]
    fixed = _student_loss(temperature=2.0, alpha=0.5)(params, {}, BATCH, jax.random.key(4), {})
    other = _student_loss(temperature=7.0, alpha=0.1)(
        params, {}, BATCH, jax.random.key(4),
        {distill.TEMPERATURE: jnp.float32(2.0), distill.ALPHA: jnp.float32(0.5)})
    assert float(fixed[0]) == pytest.approx(float(other[0]), rel=1e-6)


def test_a_distilled_student_learns_the_teacher_and_the_teacher_stays_frozen():
    loss_fn = _student_loss(temperature=2.0, alpha=1.0)  # soft targets only: no labels used
    tx = optax.adam(3e-2)
    params = STUDENT.init(jax.random.key(3), X)["params"]
    opt_state = tx.init(params)
    before = jax.tree.map(np.asarray, TEACHER_VARIABLES)

    @jax.jit
    def step(params, opt_state):
        grads, _ = jax.grad(loss_fn, has_aux=True)(params, {}, BATCH, jax.random.key(5), {})
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    def agreement(aux):  # how often the student picks the teacher's class
        return float(jnp.mean(jnp.argmax(aux["logits"], -1) == LABELS))

    first, aux = loss_fn(params, {}, BATCH, jax.random.key(5), {})
    at_init = agreement(aux)
    for _ in range(200):
        params, opt_state = step(params, opt_state)
    last, aux = loss_fn(params, {}, BATCH, jax.random.key(5), {})
    assert float(last) < 0.5 * float(first)
    # A linear student cannot copy a ReLU teacher exactly, but it learns most of its choices.
    assert agreement(aux) > max(0.7, at_init + 0.3)
    for got, want in zip(jax.tree.leaves(TEACHER_VARIABLES), jax.tree.leaves(before),
                         strict=True):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("options,message", [
    ({"form": "mse"}, "distill form='mse' is unknown"),
    ({"temperature": 0}, "distill temperature=0 must be a number > 0"),
    ({"alpha": 1.5}, "distill alpha=1.5 must be a number in [0, 1]"),
])
def test_bad_options_are_one_line(options, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[")):
        _student_loss(**options)


def test_a_teacher_that_is_neither_run_nor_pair_is_refused():
    with pytest.raises(UserError, match="teacher must be a Run"):
        distill.wrap(classification(STUDENT).loss_fn, "runs/teacher")


def test_a_config_distils_from_a_teacher_run_and_a_population_varies_temperature(tmp_path):
    from helpers import tiny_config

    from jaxopt_lab import train_and_evaluate, validate

    teacher = tiny_config("mlp", steps=20, measure=False)
    teacher_summary = train_and_evaluate(teacher, str(tmp_path / "teacher"))
    student = tiny_config("logreg", steps=20, measure=False)
    student.techniques.distill.teacher = str(tmp_path / "teacher")
    student.population = ((distill.TEMPERATURE, (1.0, 8.0)),)
    validate(student)
    summary = train_and_evaluate(student, str(tmp_path / "student"))
    described = summary["techniques"]["distill"]
    assert described["teacher_test_accuracy"] == teacher_summary["test_accuracy"]
    assert described["teacher_params"] == teacher_summary["num_params"]
    losses = [m["test_loss"] for m in summary["members"]]
    assert losses[0] != losses[1]  # each member distilled at its own temperature
    records = (tmp_path / "student" / "metrics.jsonl").read_text()
    assert "distill_soft_loss" in records


def test_a_teacher_directory_without_a_run_is_one_line(tmp_path):
    from helpers import tiny_config

    from jaxopt_lab import validate

    config = tiny_config("mlp")
    config.techniques.distill.teacher = str(tmp_path / "nothing")
    with pytest.raises(UserError, match="techniques.distill.teacher=.* holds no config.json"):
        validate(config)
