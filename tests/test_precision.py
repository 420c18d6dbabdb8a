"""Mixed precision: every model computes in bfloat16/float16 with float32 parameters and
gradients; float16's dynamic loss scaling skips overflows without calling them divergence."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from helpers import tiny_config

from jaxopt_lab import build_experiment, load_run, prepare_dataset, train_and_evaluate, validate
from jaxopt_lab.core import precision
from jaxopt_lab.core.distributed import data_mesh
from jaxopt_lab.core.metrics import read_metrics
from jaxopt_lab.core.state import create_train_state
from jaxopt_lab.core.step import make_train_step, pmean_reducer
from jaxopt_lab.core.tasks import make_task
from jaxopt_lab.errors import UserError
from jaxopt_lab.models import MODELS, build_model, with_execution
from jaxopt_lab.run.loop import TrainingDiverged

SMALL = {"mlp": {"hidden": (16, 16), "residual": True}, "cnn1d": {"channels": 4},
         "cnn2d": {"features": (4, 8)}, "resnet": {"depth": 8, "width": 4},
         "resnet18": {"width": 4, "stage_sizes": (1, 1, 1, 1)},
         "vit": {"dim": 16, "depth": 1, "heads": 2, "mlp_dim": 16},
         "transformer_lm": {"dim": 16, "depth": 1, "heads": 2, "mlp_dim": 16, "max_len": 8}}


def _batch(name: str) -> tuple[dict, str]:
    """A small batch for model `name` and the task that trains it."""
    rng = np.random.default_rng(0)
    if name == "transformer_lm":
        tokens = rng.integers(0, 10, (4, 8))
        return {"x": jnp.asarray(tokens), "label": jnp.asarray(np.roll(tokens, -1, 1))}, \
            "language_model"
    shape = (4, 40) if name in ("logreg", "mlp", "cnn1d") else (4, 8, 8, 1)
    return {"x": jnp.asarray(rng.normal(size=shape), jnp.float32),
            "label": jnp.asarray(rng.integers(0, 10, 4))}, "classification"


def _matmul_dtypes(fn, *args) -> set[str]:
    """The operand dtypes of every dot_general and conv in `fn`'s jaxpr, nested ones included."""
    found = set()

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
                found.update(str(v.aval.dtype) for v in eqn.invars)
            for value in eqn.params.values():
                for sub in value if isinstance(value, tuple | list) else (value,):
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        walk(inner)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("name", list(MODELS))
def test_every_model_computes_in_the_dtype_with_float32_params_and_gradients(name, dtype):
    batch, task = _batch(name)
    model = build_model(name, 10, dtype=dtype, **SMALL.get(name, {}))
    variables = model.init(jax.random.key(0), batch["x"][:1])
    params = variables["params"]
    state = {k: v for k, v in variables.items() if k != "params"}
    loss_fn = make_task(task, model).loss_fn

    def loss(p):
        return loss_fn(p, state, batch, jax.random.key(1), {})

    # Every matmul and conv, forward and backward, multiplies in the compute dtype.
    assert _matmul_dtypes(jax.grad(lambda p: loss(p)[0]), params) == {jnp.dtype(dtype).name}
    if dtype == jnp.float16:
        return  # one compiled run per model is enough: bfloat16's below
    (value, aux), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    assert aux["logits"].dtype == jnp.float32  # the loss and its softmax run in float32
    assert value.dtype == jnp.float32 and np.isfinite(value)
    for p, g in zip(jax.tree.leaves(params), jax.tree.leaves(grads), strict=True):
        assert p.dtype == g.dtype == jnp.float32
        assert np.isfinite(np.asarray(g)).all()
    assert any(np.abs(np.asarray(g)).max() > 0 for g in jax.tree.leaves(grads))


def _float16_step(loss_multiplier: float, scale: float | None = None, growth_interval=2000):
    """(state, jitted step) of a float16 MLP whose loss is multiplied, to overflow on purpose."""
    model = build_model("mlp", 10, dtype=jnp.float16, hidden=(16,))
    batch, _ = _batch("mlp")
    task_loss = make_task("classification", model).loss_fn

    def loss_fn(*args):
        loss, aux = task_loss(*args)
        return loss * loss_multiplier, aux

    tx = optax.adam(1e-3)
    state = create_train_state(model, batch["x"][:1], tx, lambda p: (), 1, 0)
    dynamic = state.loss_scale.dynamic.replace(growth_interval=growth_interval)
    if scale is not None:
        dynamic = dynamic.replace(scale=jnp.float32(scale))
    state = state.replace(loss_scale=state.loss_scale._replace(dynamic=dynamic))
    step = jax.jit(make_train_step(loss_fn, pmean_reducer(), tx, data_mesh()))
    return state, lambda s: step(s, batch)


def test_float16_overflow_skips_the_update_lowers_the_scale_and_is_not_divergence():
    state, step = _float16_step(loss_multiplier=1e4)
    assert float(state.loss_scale.dynamic.scale) == 2.0**16
    new, metrics = step(state)
    # The scaled gradients overflow float16: nothing but the step count and the scale moves.
    assert not np.isfinite(float(metrics["grad_norm"])) and np.isfinite(float(metrics["loss"]))
    assert float(metrics[precision.OVERFLOW]) == 1.0
    assert float(metrics[precision.LOSS_SCALE]) == 2.0**16
    assert not bool(precision.diverged(metrics))
    assert int(new.step) == 1 and int(new.loss_scale.skipped) == 1
    assert float(new.loss_scale.dynamic.scale) == 2.0**15
    for a, b in zip(jax.tree.leaves((state.params, state.opt_state)),
                    jax.tree.leaves((new.params, new.opt_state)), strict=True):
        np.testing.assert_array_equal(a, b)
    # The scale falls until the gradients fit; then updates are applied again.
    for _ in range(20):
        new, metrics = step(new)
        if float(metrics[precision.OVERFLOW]) == 0:
            break
    assert np.isfinite(float(metrics["grad_norm"])) and not bool(precision.diverged(metrics))
    assert int(new.loss_scale.skipped) > 1 and float(new.loss_scale.dynamic.scale) < 2.0**15
    assert not np.array_equal(new.params["Dense_0"]["kernel"], state.params["Dense_0"]["kernel"])


def test_float16_scale_grows_after_growth_interval_finite_steps_and_floors_at_one():
    state, step = _float16_step(loss_multiplier=1.0, scale=8.0, growth_interval=2)
    scales = []
    for _ in range(5):
        state, metrics = step(state)
        scales.append(float(metrics[precision.LOSS_SCALE]))
    assert scales == [8.0, 8.0, 8.0, 16.0, 16.0]  # DynamicScale: grows after 2 finite in a row
    # At the floor (1) non-finite gradients are the model's own: divergence, update skipped.
    state, step = _float16_step(loss_multiplier=1e9, scale=1.0)
    new, metrics = step(state)
    assert float(metrics[precision.OVERFLOW]) == 0.0 and bool(precision.diverged(metrics))
    assert float(new.loss_scale.dynamic.scale) == 1.0
    np.testing.assert_array_equal(new.params["Dense_0"]["kernel"],
                                  state.params["Dense_0"]["kernel"])


def _overflowing_loss(multiplier: float):
    """A classification loss times `multiplier`: at the initial scale its gradients overflow."""
    def make(model):
        task_loss = make_task("classification", model).loss_fn

        def loss_fn(params, model_state, batch, rng, hparams):
            loss, aux = task_loss(params, model_state, batch, rng, hparams)
            return loss * multiplier, aux

        return loss_fn

    return make


def _float16_config(steps: int = 20, **train):
    config = tiny_config("mlp", steps=steps, compute_dtype="float16", log_every=5, **train)
    config.model.hidden = (16,)
    return config


def test_float16_run_skips_overflows_reports_them_and_resumes_exactly(tmp_path):
    model = build_model("mlp", 10, dtype=jnp.float16, hidden=(16,))
    loss_fn = _overflowing_loss(1e4)(model)
    config = _float16_config(checkpoint_every=10)
    reference = train_and_evaluate(config, str(tmp_path / "ref"), model=model, loss_fn=loss_fn)
    assert reference["skipped_steps"] > 0 and reference["loss_scale"] < 2.0**16
    assert reference["step_memory"]["peak_bytes"] > 0
    first = read_metrics(str(tmp_path / "ref"))[0]
    assert first[precision.OVERFLOW] > 0 and first[precision.LOSS_SCALE] <= 2.0**16

    # Stopped at the step-10 checkpoint, then rerun: the same scale, skips and parameters.
    short = _float16_config(steps=10)
    train_and_evaluate(short, str(tmp_path / "run"), model=model, loss_fn=loss_fn)
    resumed = train_and_evaluate(config, str(tmp_path / "run"), model=model, loss_fn=loss_fn)
    assert resumed["resumed_from"] == 10
    for key in ("skipped_steps", "loss_scale", "test_loss"):
        assert resumed[key] == reference[key], key
    got = load_run(str(tmp_path / "run"), model=model).state
    want = load_run(str(tmp_path / "ref"), model=model).state
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(a, b)


def test_float16_population_members_are_not_stopped_by_skipped_overflows(tmp_path):
    model = build_model("mlp", 10, dtype=jnp.float16, hidden=(16,))
    config = _float16_config(steps=10)
    config.population = (("seed", (0, 1)),)
    validate(config)
    summary = train_and_evaluate(config, str(tmp_path), model=model,
                                 loss_fn=_overflowing_loss(1e4)(model))
    assert all(m["active"] and m["skipped_steps"] > 0 for m in summary["members"])


def test_float16_real_divergence_still_stops_the_run(tmp_path):
    config = _float16_config(steps=20)
    config.optim.lr = 1e5  # the parameters blow up; the float16 forward pass overflows
    config.train.float32_layers = ()  # every layer in float16, the logits' too
    with pytest.raises(TrainingDiverged, match="non-finite"):
        train_and_evaluate(config, str(tmp_path))


def test_a_checkpoint_written_before_the_loss_scale_field_restores(tmp_path):
    """A float32 state has no loss-scale leaves, and a checkpoint saved without the field (as
    every run before it was) restores into today's TrainState."""
    from jaxopt_lab.core.checkpoint import Checkpointer

    config = tiny_config("mlp", steps=2)
    dataset = prepare_dataset(config)
    experiment = build_experiment(config, dataset)
    state = create_train_state(experiment.model, dataset.train["x"][:1], experiment.tx,
                               experiment.reducer.init, 1, 0)
    assert state.loss_scale is None and not jax.tree.leaves(state.loss_scale)
    old_layout = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)
                  if f.name != "loss_scale"}
    checkpointer = Checkpointer(str(tmp_path), keep=1)
    checkpointer.save(7, old_layout)
    checkpointer.wait()
    restored, step = checkpointer.restore(jax.tree.map(jnp.zeros_like, state))
    checkpointer.close()
    assert step == 7 and restored.loss_scale is None
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_compressor_sees_float32_gradients_from_a_bfloat16_model():
    from jaxopt_lab.techniques import compress

    seen = []
    inner = compress.topk(0.5, min_size=1)

    def reduce(grads, comm_state, rng, hparams):
        seen.extend(g.dtype for g in jax.tree.leaves(grads))
        return inner.reduce(grads, comm_state, rng, hparams)

    model = build_model("cnn1d", 10, dtype=jnp.bfloat16, channels=4)
    batch, _ = _batch("cnn1d")
    tx = optax.sgd(0.1)
    reducer = inner._replace(reduce=reduce)
    state = create_train_state(model, batch["x"][:1], tx, reducer.init, 1, 0)
    step = make_train_step(make_task("classification", model).loss_fn, reducer, tx, data_mesh())
    _, metrics = jax.jit(step)(state, batch)
    assert seen and set(seen) == {jnp.dtype(jnp.float32)}
    assert np.isfinite(float(metrics["loss"]))


class _NoExecutionFields(nn.Module):
    num_classes: int

    @nn.compact
    def __call__(self, x, train=False):
        return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))


def test_a_module_without_the_fields_is_refused_a_dtype_or_remat_with_one_line():
    model = _NoExecutionFields(10)
    assert with_execution(model) is model  # the defaults ask nothing of it
    with pytest.raises(UserError, match=r"train.compute_dtype='bfloat16' needs a `dtype` field"):
        with_execution(model, dtype=jnp.bfloat16)
    with pytest.raises(UserError, match=r"train.remat='full' needs a `remat` field"):
        with_execution(model, remat="full")
    config = tiny_config("mlp", steps=2, compute_dtype="bfloat16")
    with pytest.raises(UserError, match="needs a `dtype` field on model _NoExecutionFields"):
        build_experiment(config, prepare_dataset(config), model=model)
    # A registry model passed from Python gets the config's dtype.
    built = build_experiment(config, prepare_dataset(config), model=build_model("mlp", 10))
    assert built.model.dtype == jnp.bfloat16


@pytest.mark.parametrize(("key", "value", "match"), [
    ("compute_dtype", "float64",
     "train.compute_dtype='float64' is unknown; allowed: float32, bfloat16, float16"),
    ("compute_dtype", "bf16", "train.compute_dtype='bf16' is unknown"),
    ("remat", "sometimes", "train.remat='sometimes' is unknown; allowed: none, full, "),
    ("float32_layers", (0,), r"train.float32_layers=\(0,\) must be a tuple of regular"),
    ("float32_layers", ("Conv_[",), r"train.float32_layers: 'Conv_\[' is not a regular"),
    # a policy factory needs arguments a config cannot give
    ("remat", "save_only_these_names", "train.remat='save_only_these_names' is unknown"),
])
def test_bad_precision_config_is_one_line(key, value, match):
    config = tiny_config("mlp", steps=2)
    config.train[key] = value
    with pytest.raises(UserError, match=match):
        validate(config)


def test_good_precision_config_validates_and_reaches_the_model():
    config = tiny_config("resnet", steps=2, compute_dtype="bfloat16", remat="dots_saveable")
    config.data.name = "digits"
    experiment = build_experiment(config, prepare_dataset(config))
    assert experiment.model.dtype == jnp.bfloat16 and experiment.model.remat == "dots_saveable"


def _products_in_order(model, x) -> list[str]:
    """The dtype of each dot_general and conv of `model`'s forward pass, in the order it runs."""
    variables = model.init(jax.random.key(0), x)
    eqns = jax.make_jaxpr(lambda v: model.apply(v, x))(variables).jaxpr.eqns
    return [str(e.invars[0].aval.dtype) for e in eqns
            if e.primitive.name in ("dot_general", "conv_general_dilated")]


class _OwnCNN(nn.Module):
    """A user's module with a `dtype` field, nothing of the registry."""

    num_classes: int = 10
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3,), dtype=self.dtype, name="stem")(x[..., None]))
        x = nn.relu(nn.Conv(4, (3,), dtype=self.dtype, name="body")(x))
        return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x.reshape(len(x), -1))


@pytest.mark.parametrize(("layers", "want"), [
    (None, ["float32", "bfloat16", "bfloat16", "float32"]),  # the input's and the logits' layer
    ((), ["bfloat16"] * 4),
    ((r"^\['Conv_1'\]",), ["bfloat16", "float32", "bfloat16", "bfloat16"]),
])
def test_float32_layers_compute_in_float32_and_the_rest_in_the_compute_dtype(layers, want):
    config = tiny_config("cnn1d", steps=2, compute_dtype="bfloat16")
    config.model.channels = 4
    config.train.float32_layers = layers
    validate(config)
    model = build_experiment(config, prepare_dataset(config)).model
    x = jnp.zeros((2, 40), jnp.float32)
    assert _products_in_order(model, x) == want
    assert _products_in_order(model.clone(), x) == want  # clones (techniques) keep the policy
    params = model.init(jax.random.key(0), x)["params"]
    plain = build_model("cnn1d", 10, channels=4).init(jax.random.key(0), x)["params"]
    assert jax.tree.structure(params) == jax.tree.structure(plain)  # same paths, checkpoints


def test_a_users_own_module_gets_the_policy_and_the_summary_records_it(tmp_path):
    config = tiny_config("cnn1d", steps=2, compute_dtype="bfloat16")
    model = build_experiment(config, prepare_dataset(config), model=_OwnCNN()).model
    stem_and_head = (r"^\['stem'\]", r"^\['head'\]")
    assert model.float32_layers == stem_and_head
    assert _products_in_order(model, jnp.zeros((2, 40))) == ["float32", "bfloat16", "float32"]
    # Passed as composed (its policy field set): the run records the user's class, not the field.
    summary = train_and_evaluate(config, str(tmp_path), model=model)
    assert summary["precision"] == {"compute_dtype": "bfloat16",
                                    "float32_layers": list(stem_and_head)}
    recorded = json.loads((tmp_path / "config.json").read_text())["model"]
    assert recorded["name"].endswith(":_OwnCNN") and "float32_layers" not in recorded
    assert load_run(str(tmp_path)).experiment.model.float32_layers == stem_and_head


@pytest.fixture(scope="module")
def digits_teacher(tmp_path_factory) -> str:
    """A float32 teacher for the bfloat16 student."""
    workdir = str(tmp_path_factory.mktemp("teacher"))
    config = tiny_config("cnn2d", steps=10)
    config.data.name = "digits"
    config.model.features = (8, 8)
    train_and_evaluate(config, workdir)
    return workdir


@pytest.mark.parametrize("technique", ["quantize", "prune", "distill", "compress"])
def test_each_technique_trains_in_bfloat16(request, tmp_path, technique):
    config = tiny_config("cnn2d", steps=10, compute_dtype="bfloat16")
    config.data.name = "digits"
    config.model.features = (8, 8)
    block = config.techniques[technique]
    if technique == "quantize":
        block.method = "qat"
    elif technique == "prune":
        block.method, block.sparsity, block.frequency = "magnitude", 0.5, 2
    elif technique == "compress":
        block.method, block.ratio, block.min_size = "topk", 0.1, 16
    else:
        block.teacher = request.getfixturevalue("digits_teacher")
    validate(config)
    summary = train_and_evaluate(config, str(tmp_path))
    assert technique in summary["techniques"]
    assert np.isfinite(summary["test_loss"]) and summary["steps"] == 10
    model = load_run(str(tmp_path)).experiment.model
    assert model.dtype == jnp.bfloat16
