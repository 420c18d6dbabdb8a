"""Distillation's data and extra parameters: the labelled mask of the hard loss, transfer sets,
precomputed teacher logits and feature hints, with modules defined here."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopt_lab.core.state import HINTS, model_params
from jaxopt_lab.core.tasks import LABELED, classification
from jaxopt_lab.data.sources import Dataset, load_dataset
from jaxopt_lab.errors import UserError
from jaxopt_lab.techniques import distill
from jaxopt_lab.techniques.distill import hints


class Net(nn.Module):
    width: int

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(self.width, name="hidden")(x))
        return nn.Dense(3, name="out")(h)


X = jax.random.normal(jax.random.key(0), (32, 6))
TEACHER, STUDENT = Net(16), Net(4)
TEACHER_VARIABLES = TEACHER.init(jax.random.key(1), X)
STUDENT_PARAMS = STUDENT.init(jax.random.key(2), X)["params"]
LABELS = jnp.arange(32) % 3


def test_the_hard_loss_averages_over_labelled_examples_only():
    loss_fn = classification(STUDENT).loss_fn
    labeled = (jnp.arange(32) < 20).astype(jnp.float32)
    garbage = jnp.where(labeled > 0, LABELS, 2 - LABELS)  # what an unlabeled example carries
    masked, aux = loss_fn(STUDENT_PARAMS, {}, {"x": X, "label": garbage, LABELED: labeled},
                          jax.random.key(3), {})
    subset, sub_aux = loss_fn(STUDENT_PARAMS, {}, {"x": X[:20], "label": LABELS[:20]},
                              jax.random.key(3), {})
    assert float(masked) == pytest.approx(float(subset), rel=1e-6)
    assert float(aux["metrics"]["accuracy"]) == pytest.approx(
        float(sub_aux["metrics"]["accuracy"]), rel=1e-6)


def _dataset(n=10) -> Dataset:
    x = np.arange(n * 6, dtype=np.float32).reshape(n, 6)
    return Dataset(train={"x": x, "label": np.arange(n, dtype=np.int32) % 3},
                   test={"x": x[:2], "label": np.zeros(2, np.int32)}, num_classes=3,
                   input_shape=(6,), name="toy")


def test_a_transfer_set_joins_the_training_arrays_unlabeled_and_spread_among_them():
    extra = -np.ones((30, 6), np.float32)
    train = distill.with_transfer(_dataset(), extra).train
    assert len(train["x"]) == len(train["label"]) == len(train[LABELED]) == 40
    assert train[LABELED].sum() == 10
    assert np.all(train["x"][train[LABELED] == 0] == -1)  # the transfer inputs, unlabeled
    labeled = train["x"][train[LABELED] == 1]
    assert sorted(labeled[:, 0]) == sorted(_dataset().train["x"][:, 0])  # every original once
    positions = np.flatnonzero(train[LABELED])
    assert positions.min() < 10 and positions.max() >= 30  # not all at one end


def test_transfer_inputs_are_fresh_mnist1d_samples_cached_in_the_data_dir(tmp_path):
    x = distill.transfer_inputs("mnist1d", 25, str(tmp_path))
    assert x.shape == (25, 40) and x.dtype == np.float32
    assert np.array_equal(distill.transfer_inputs("mnist1d", 25, str(tmp_path)), x)
    data = load_dataset("mnist1d")
    for split in (data.train["x"], data.test["x"]):
        distances = np.abs(x[:, None, :] - split[None, :, :]).max(-1)
        assert distances.min() > 1e-3  # none is a training or test example
    assert abs(float(x.mean())) < 0.5 and 0.5 < float(x.std()) < 1.5  # standardized like them


def test_a_data_set_without_a_generator_is_pointed_to_augmentation():
    with pytest.raises(UserError, match="data set 'digits' has no generator.*data.augment"):
        distill.transfer_inputs("digits", 10)


def test_precomputed_teacher_logits_replace_the_teachers_forward_in_the_loss():
    forward = distill.teacher_fn((TEACHER, TEACHER_VARIABLES))
    dataset = Dataset(train={"x": np.asarray(X), "label": np.asarray(LABELS)}, test={},
                      num_classes=3, input_shape=(6,), name="toy")
    dataset = distill.with_teacher_logits(dataset, forward, batch_size=10)  # uneven batches
    logits = dataset.train[distill.TEACHER_LOGITS]
    np.testing.assert_allclose(logits, TEACHER.apply(TEACHER_VARIABLES, X), rtol=1e-5, atol=1e-6)
    loss_fn = distill.wrap(classification(STUDENT).loss_fn, (TEACHER, TEACHER_VARIABLES))
    batch = {"x": X, "label": LABELS}
    in_step, _ = loss_fn(STUDENT_PARAMS, {}, batch, jax.random.key(4), {})
    read, _ = loss_fn(STUDENT_PARAMS, {}, {**batch, distill.TEACHER_LOGITS: logits},
                      jax.random.key(4), {})
    assert float(read) == pytest.approx(float(in_step), rel=1e-5)
    other, _ = loss_fn(STUDENT_PARAMS, {}, {**batch, distill.TEACHER_LOGITS: -logits},
                       jax.random.key(4), {})
    assert float(other) != pytest.approx(float(in_step), rel=1e-3)  # they are what it reads


def _hinted(weight=1.0):
    features = (("hidden", "hidden"),)
    forward = distill.teacher_fn((TEACHER, TEACHER_VARIABLES), capture=["hidden"])
    init = hints.init_hints(STUDENT, X[:1], forward, features)
    params = {**STUDENT_PARAMS, **init(jax.random.key(5))}
    loss_fn = distill.wrap(classification(STUDENT, capture=["hidden"]).loss_fn,
                           (TEACHER, TEACHER_VARIABLES), features=features, feature_weight=weight)
    return params, loss_fn


def test_feature_hints_train_a_map_in_their_own_params_subtree():
    params, loss_fn = _hinted()
    assert params[HINTS]["0"]["projection"].shape == (4, 16)  # student width -> teacher width
    assert set(model_params(params)) == set(STUDENT_PARAMS)  # the model's own, for export
    grads, aux = jax.grad(loss_fn, has_aux=True)(params, {}, {"x": X, "label": LABELS},
                                                 jax.random.key(6), {})
    assert float(jnp.abs(grads[HINTS]["0"]["projection"]).sum()) > 0
    hint = aux["metrics"]["distill_hint_loss"]
    assert float(hint) > 0
    unweighted, _ = _hinted(0.0)[1](params, {}, {"x": X, "label": LABELS}, jax.random.key(6), {})
    weighted, _ = loss_fn(params, {}, {"x": X, "label": LABELS}, jax.random.key(6), {})
    assert float(weighted) == pytest.approx(float(unweighted) + float(hint), rel=1e-5)


def test_a_hint_map_that_fits_exactly_gives_zero_hint_loss():
    forward = distill.teacher_fn((TEACHER, TEACHER_VARIABLES), capture=["hidden"])
    _, taught = forward(X)
    student = {"hidden": taught["hidden"][:, :4]}
    teacher = {"hidden": taught["hidden"][:, :4] @ jnp.eye(4, 16)}
    params = {HINTS: {"0": {"projection": jnp.eye(4, 16)}}}
    assert float(hints.hint_loss(params, student, teacher, (("hidden", "hidden"),))) == 0.0


@pytest.mark.parametrize("features,message", [
    ((("hidden",),), "is not a \\(student layer, teacher layer\\) pair"),
    ((("nope", "hidden"),), "the student has no layer 'nope'"),
    ((("hidden", "nope"),), "the teacher has no layer 'nope'"),
])
def test_bad_feature_pairs_are_one_line(features, message):
    with pytest.raises(UserError, match=message):
        pairs = hints.check_features(features, 1.0)
        forward = distill.teacher_fn((TEACHER, TEACHER_VARIABLES),
                                     capture=[t for _, t in pairs])
        hints.init_hints(STUDENT, X[:1], forward, pairs)
