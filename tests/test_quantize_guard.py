"""The pinned-stack guard: AQT reaches into JAX internals and has broken on JAX upgrades, so an
upgrade that breaks it must fail here. Every supported option set on one small model, and one
representative option set on every registry model: a gradient through it (finite, reaching every
quantized kernel) and its serving conversion, whose outputs must equal the quantized model's
compiled evaluation bit for bit. Kept to about a minute."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxopt_lab.core.tasks import apply_model
from jaxopt_lab.models import MODELS, build_model
from jaxopt_lab.techniques import quantize

SIGNALS = jax.random.normal(jax.random.key(0), (4, 40))
IMAGES = jax.random.uniform(jax.random.key(1), (4, 8, 8))
TOKENS = jax.random.randint(jax.random.key(2), (4, 8), 0, 10)
LABELS = jnp.arange(4) % 10

OPTION_SETS = {
    "int8_w8a8": {},
    "int8_weights_only": {"activations": False},
    "int8_fully_quantized": {"backward": "quantized"},
    "int8_per_tensor": {"per_channel": False},
    "int4": {"bits": 4},
    "int4_fully_quantized": {"bits": 4, "backward": "quantized"},
    "fp8_e4m3": {"numerics": "fp8_e4m3"},
    "fp8_e5m2": {"numerics": "fp8_e5m2"},
    "fp8_fully_quantized": {"numerics": "fp8_e4m3", "backward": "quantized"},
    "int8_static_activations": {"static_activations": True},
}
# Small instances of every registry model, with an input each takes.
REGISTRY = {
    "logreg": ({}, SIGNALS),
    "mlp": ({"hidden": (16,)}, SIGNALS),
    "cnn1d": ({"channels": 4}, SIGNALS),
    "cnn2d": ({"features": (4, 8)}, IMAGES),
    "resnet": ({"width": 4, "depth": 8}, IMAGES),
    "resnet18": ({"width": 4, "stage_sizes": (1, 1, 1, 1)}, IMAGES),
    "vit": ({"dim": 16, "depth": 1, "heads": 2, "mlp_dim": 16, "patch_size": 4}, IMAGES),
    "transformer_lm": ({"dim": 16, "depth": 1, "heads": 2, "mlp_dim": 16, "max_len": 8},
                       TOKENS),
}


def _check(float_model, x, **options) -> None:
    model = quantize.wrap(float_model, skip=(), **options)
    variables = jax.jit(model.init)({"params": jax.random.key(0), "dropout": jax.random.key(1)},
                                    x)
    params = variables["params"]
    state = {k: v for k, v in variables.items() if k != "params"}
    if options.get("static_activations"):
        state = {k: v for k, v in quantize.calibrate(model, variables, [x]).items()
                 if k != "params"}

    def loss(params):
        outputs, _, _ = apply_model(model, params, state, x, jax.random.key(3), train=True)
        labels = LABELS if outputs.ndim == 2 else x
        return optax.softmax_cross_entropy_with_integer_labels(outputs, labels).mean()

    # Static activation scales are for post-training quantization, which takes no gradient (and
    # aqtp 0.9.0 cannot differentiate a layer holding variables on jax >= 0.10: it calls the
    # removed jax.core.get_aval).
    if not options.get("static_activations"):
        grads = jax.jit(jax.grad(loss))(params)
        for path, g in jax.tree_util.tree_leaves_with_path(grads):
            assert bool(jnp.isfinite(g).all()), jax.tree_util.keystr(path)
            if jax.tree_util.keystr(path).endswith("['kernel']"):
                assert float(jnp.abs(g).sum()) > 0, jax.tree_util.keystr(path)

    @jax.jit
    def evaluate(params, state, x):
        return apply_model(model, params, state, x, None, train=False)[0]

    serving = quantize.convert(model, {"params": params, **state}, x)
    assert serving[quantize.QUANT_COLLECTION], "nothing was frozen"
    np.testing.assert_array_equal(jax.jit(quantize.serve_fn(model))(serving, x),
                                  evaluate(params, state, x))


@pytest.mark.parametrize("options", list(OPTION_SETS))
def test_every_option_set_trains_and_serves_on_a_small_cnn(options):
    _check(build_model("cnn1d", 10, channels=4), SIGNALS, **OPTION_SETS[options])


def test_the_guard_covers_the_whole_registry():
    assert set(REGISTRY) == set(MODELS)


@pytest.mark.slow  # compiling ResNet, ViT and the LM quantized takes a minute: `make test` only
@pytest.mark.parametrize("name", list(REGISTRY))
def test_every_registry_model_trains_and_serves_quantized(name):
    hparams, x = REGISTRY[name]
    _check(build_model(name, 10, **hparams), x)
