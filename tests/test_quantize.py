"""Quantization at the model seam, in process: `quantize.wrap` on a module defined here, conv
QAT gradients, attention matmuls, the serving form (size, dtypes, bit-identity with the QAT
model's compiled evaluation), PTQ calibration, options and config errors."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxopt_lab import default_config, validate
from jaxopt_lab.core.measure import model_bytes
from jaxopt_lab.errors import UserError
from jaxopt_lab.models import build_model
from jaxopt_lab.techniques import quantize

X40 = jax.random.normal(jax.random.key(0), (16, 40))
DIGITS = jax.random.uniform(jax.random.key(1), (16, 8, 8))
LABELS = jnp.arange(16) % 10


class TwoLayer(nn.Module):
    """A user's own module: it knows nothing of AQT, only takes the seam."""

    dot_general_cls: Any = None

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(32, dot_general_cls=self.dot_general_cls)(x))
        return nn.Dense(10, dot_general_cls=self.dot_general_cls)(x)


def _loss(model, params, x, rng=None):
    rng = jax.random.key(5) if rng is None else rng
    logits = model.apply({"params": params}, x, rngs={"params": rng})
    return optax.softmax_cross_entropy_with_integer_labels(logits, LABELS).mean()


def _eval(model):
    """The model's inference, compiled, as the task's evaluation runs it."""
    return jax.jit(lambda v, x: model.apply(v, x, rngs={"params": jax.random.key(0)}))


def test_wrap_trains_a_users_own_module_and_serves_it_bit_identically():
    float_model = TwoLayer()
    model = quantize.wrap(float_model, skip=())
    params = jax.jit(float_model.init)(jax.random.key(0), X40)["params"]
    assert jax.tree.structure(jax.jit(model.init)(jax.random.key(0), X40)["params"]) == \
        jax.tree.structure(params)  # the same parameters: a float checkpoint loads
    tx = optax.adam(1e-2)
    opt_state = tx.init(params)
    first = _loss(model, params, X40)

    @jax.jit
    def step(params, opt_state):
        updates, opt_state = tx.update(jax.grad(lambda p: _loss(model, p, X40))(params),
                                       opt_state)
        return optax.apply_updates(params, updates), opt_state

    for _ in range(30):
        params, opt_state = step(params, opt_state)
    assert _loss(model, params, X40) < 0.5 * first
    # The quantized forward differs from the float one (it is not a pass-through)...
    assert not np.array_equal(model.apply({"params": params}, X40, rngs={"params":
                                                                         jax.random.key(0)}),
                              float_model.apply({"params": params}, X40))
    # ...and its serving form reproduces it exactly, without float kernels.
    serving = quantize.convert(model, {"params": params}, X40)
    assert all("kernel" not in layer for layer in serving["params"].values())
    np.testing.assert_array_equal(jax.jit(quantize.serve_fn(model))(serving, X40),
                                  _eval(model)({"params": params}, X40))


def test_wrap_explains_what_a_module_without_the_seam_or_default_skip_needs():
    class NoSeam(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3)(x)

    with pytest.raises(UserError, match="no dot_general_cls field"):
        quantize.wrap(NoSeam(), skip=())
    with pytest.raises(UserError, match="needs sample_x"):
        quantize.wrap(TwoLayer())
    with pytest.raises(UserError, match="unknown quantize option"):
        quantize.wrap(TwoLayer(), skip=(), bitz=8)


def test_default_skip_keeps_the_first_and_last_layers_in_float():
    model = quantize.wrap(build_model("cnn1d", 10), sample_x=X40)
    _, skip = quantize.quantization_of(model)
    assert skip == (r"^\['Conv_0'\]", r"^\['Dense_0'\]")
    variables = jax.jit(model.init)(jax.random.key(0), X40)
    serving = quantize.convert(model, variables, X40)
    frozen = serving[quantize.QUANT_COLLECTION]
    assert sorted(frozen) == ["Conv_1", "Conv_2"]
    assert "kernel" in serving["params"]["Conv_0"] and "kernel" in serving["params"]["Dense_0"]


def test_conv_kernels_get_nonzero_gradients_under_conv_qat():
    float_model = build_model("cnn2d", 10)
    model = quantize.wrap(float_model, skip=())
    params = jax.jit(model.init)(jax.random.key(0), DIGITS)["params"]
    grads = jax.grad(lambda p: _loss(model, p, DIGITS))(params)
    float_grads = jax.grad(lambda p: _loss(float_model, p, DIGITS))(params)
    for layer in ("Conv_0", "Conv_1"):
        assert float(jnp.abs(grads[layer]["kernel"]).sum()) > 0, layer
        # The gradient is of the quantized forward, not the float one.
        assert not np.allclose(grads[layer]["kernel"], float_grads[layer]["kernel"]), layer


def _int8_dots(model, x) -> int:
    """The matmuls that run on int8 operands in the model's forward."""
    jaxpr = jax.make_jaxpr(lambda v: model.apply(v, x, rngs={"params": jax.random.key(0)}))(
        jax.jit(model.init)(jax.random.key(0), x))

    def count(jaxpr) -> int:
        n = 0
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general" and all(
                    v.aval.dtype == jnp.int8 for v in eqn.invars):
                n += 1
            for value in eqn.params.values():  # scans, custom_vjp and pjit bodies
                for sub in value if isinstance(value, tuple | list) else (value,):
                    if hasattr(sub, "eqns"):
                        n += count(sub)
                    elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
                        n += count(sub.jaxpr)
        return n

    return count(jaxpr.jaxpr)


def test_vit_attention_matmuls_are_quantized_when_asked():
    vit = build_model("vit", 10, dim=16, depth=1, heads=2, mlp_dim=16, patch_size=4)
    with_attention = _int8_dots(quantize.wrap(vit, skip=()), DIGITS)
    without = _int8_dots(quantize.wrap(vit, skip=(), attention=False), DIGITS)
    weights_only = _int8_dots(quantize.wrap(vit, skip=(), activations=False), DIGITS)
    # embed, q, k, v, out, two MLP layers, head = 8 projections; + QK^T and weights x V.
    assert (without, with_attention, weights_only) == (8, 10, 0)


@pytest.mark.parametrize("activations", [False, True], ids=["w8", "w8a8"])
def test_serving_form_of_every_layer_is_3_8x_smaller_and_bit_identical(activations):
    """Digits CNN with skip=(): int8 values with per-channel float scales and float biases."""
    float_model = build_model("cnn2d", 10)
    model = quantize.wrap(float_model, skip=(), activations=activations)
    variables = jax.jit(float_model.init)(jax.random.key(0), DIGITS)
    serving = quantize.convert(model, variables, DIGITS)
    assert model_bytes(variables) / model_bytes(serving) >= 3.8
    values = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(serving)
              if "value" in jax.tree_util.keystr(path)]
    assert len(values) == 3 and all(v.dtype == jnp.int8 for v in values)
    np.testing.assert_array_equal(jax.jit(quantize.serve_fn(model))(serving, DIGITS),
                                  _eval(model)(variables, DIGITS))


def test_serving_bytes_of_the_25_channel_cnn_are_int8_kernels_plus_float_scales_and_biases():
    """The 25-channel MNIST-1D CNN is small enough that per-channel scales show: int8 kernels
    (5125 bytes) + float32 biases and per-channel scales (85 + 85 floats) is 3.59x; per-tensor
    scales reach 3.8x."""
    x = jnp.zeros((2, 40, 1))
    float_model = build_model("cnn1d", 10)
    variables = jax.jit(float_model.init)(jax.random.key(0), x)
    kernels = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(variables)
               if "kernel" in jax.tree_util.keystr(path)]
    biases = sum(leaf.size for path, leaf in jax.tree_util.tree_leaves_with_path(variables)
                 if "bias" in jax.tree_util.keystr(path))
    sizes = {}
    for per_channel in (True, False):
        model = quantize.wrap(float_model, skip=(), activations=False, per_channel=per_channel)
        sizes[per_channel] = model_bytes(quantize.convert(model, variables, x))
    scales = sum(k.shape[-1] for k in kernels)  # one per output channel of each layer
    assert sizes[True] == sum(k.size for k in kernels) + 4 * (biases + scales)
    assert sizes[False] == sum(k.size for k in kernels) + 4 * (biases + len(kernels))
    assert model_bytes(variables) / sizes[False] >= 3.8 > model_bytes(variables) / sizes[True]


@pytest.mark.parametrize("options, dtype", [({"bits": 4}, jnp.int4),
                                            ({"numerics": "fp8_e4m3"}, jnp.float8_e4m3fn),
                                            ({"numerics": "fp8_e5m2"}, jnp.float8_e5m2)])
def test_int4_and_fp8_serving_store_their_own_dtype(options, dtype):
    model = quantize.wrap(TwoLayer(), skip=(), **options)
    variables = jax.jit(model.init)(jax.random.key(0), X40)
    serving = quantize.convert(model, variables, X40)
    values = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(serving)
              if "value" in jax.tree_util.keystr(path)]
    assert values and all(v.dtype == dtype for v in values)
    np.testing.assert_array_equal(jax.jit(quantize.serve_fn(model))(serving, X40),
                                  _eval(model)(variables, X40))


def test_per_tensor_scales_are_one_number_per_weight():
    model = quantize.wrap(build_model("cnn1d", 10), skip=(), per_channel=False)
    variables = jax.jit(model.init)(jax.random.key(0), X40)
    serving = quantize.convert(model, variables, X40)
    scales = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(serving)
              if "scale" in jax.tree_util.keystr(path)]
    assert len(scales) == 4 and all(s.size == 1 for s in scales)


def test_fully_quantized_training_rounds_gradients_stochastically():
    model = quantize.wrap(TwoLayer(), skip=(), backward="quantized")
    forward_only = quantize.wrap(TwoLayer(), skip=())
    params = jax.jit(model.init)(jax.random.key(0), X40)["params"]

    def grad(m, key):
        return jax.grad(lambda p: _loss(m, p, X40, key))(params)["Dense_0"]["kernel"]

    a, b = grad(model, jax.random.key(1)), grad(model, jax.random.key(2))
    assert not np.array_equal(a, b)  # the noise comes from the step's key
    np.testing.assert_array_equal(a, grad(model, jax.random.key(1)))
    reference = grad(forward_only, jax.random.key(1))
    assert not np.array_equal(a, reference)
    # Unbiased: close to the forward-only gradient in direction.
    cosine = float(jnp.vdot(a, reference) / (jnp.linalg.norm(a) * jnp.linalg.norm(reference)))
    assert cosine > 0.95


def test_static_calibration_fills_activation_ranges_and_serves_identically():
    float_model = build_model("cnn1d", 10)
    model = quantize.wrap(float_model, skip=(), static_activations=True)
    variables = jax.jit(float_model.init)(jax.random.key(0), X40)
    batches = [X40[:8], X40[8:]]
    calibrated = quantize.calibrate(model, variables, batches)
    counts = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(
        calibrated[quantize.QUANT_COLLECTION]) if "count" in jax.tree_util.keystr(path)]
    assert counts and all(int(c) == len(batches) for c in counts)
    out = _eval(model)(calibrated, X40)
    assert bool(jnp.isfinite(out).all())
    serving = quantize.convert(model, calibrated, X40)
    np.testing.assert_array_equal(jax.jit(quantize.serve_fn(model))(serving, X40), out)


@pytest.mark.parametrize("key, value, message", [
    ("method", "ptq", "techniques.quantize.method='ptq' is unknown"),
    ("bits", 3, "techniques.quantize.bits=3 is not supported"),
    ("numerics", "fp4", "techniques.quantize.numerics='fp4' is unknown"),
    ("backward", "int", "techniques.quantize.backward='int' is unknown"),
    ("skip", "Dense", "'techniques.quantize.skip' must be a tuple or None"),
])
def test_bad_quantize_config_values_get_one_line_naming_the_key(key, value, message):
    config = default_config()
    config.techniques.quantize[key] = value if key != "skip" else None
    if key == "skip":
        with config.techniques.quantize.ignore_type():
            config.techniques.quantize.skip = value
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate(config)


def test_fp8_takes_only_8_bits_and_an_unknown_key_is_named():
    config = default_config()
    config.techniques.quantize.numerics = "fp8_e4m3"
    config.techniques.quantize.bits = 4
    with pytest.raises(UserError, match="fp8 is 8 bits"):
        validate(config)
    config = default_config()
    with config.techniques.quantize.unlocked():
        config.techniques.quantize.bitz = 8
    with pytest.raises(UserError, match="'techniques.quantize.bitz'"):
        validate(config)


def test_options_describe_the_scheme():
    assert quantize.QuantizeOptions().scheme == "w8a8"
    assert quantize.QuantizeOptions(activations=False, bits=4).scheme == "w4"
    assert quantize.QuantizeOptions(numerics="fp8_e5m2").scheme == "fp8_e5m2"
    described = dataclasses.asdict(quantize.QuantizeOptions(skip=("a",)))
    assert described["skip"] == ("a",)
