"""The shared `skip` convention: patterns over parameter paths, and the default that keeps the
layer reading the input and the one writing the logits."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopt_lab.core.layers import default_skip, layers_in_call_order, param_paths, touched
from jaxopt_lab.models import build_model

INPUTS = {"mlp": (1, 40), "cnn1d": (1, 40), "cnn2d": (1, 8, 8, 1), "resnet": (1, 8, 8, 3),
          "vit": (1, 8, 8, 1), "logreg": (1, 40)}


def _model(name: str, **hparams):
    model = build_model(name, 10, **hparams)
    x = jnp.zeros(INPUTS[name])
    return model, jax.eval_shape(model.init, jax.random.key(0), x), x


def _skipped(params, skip) -> list[str]:
    flags = jax.tree.leaves(touched(params, skip))
    return [path for path, flag in zip(param_paths(params), flags, strict=True) if not flag]


@pytest.mark.parametrize("name, first, last", [
    ("mlp", "['Dense_0']", "['Dense_2']"),
    ("cnn1d", "['Conv_0']", "['Dense_0']"),
    ("resnet", "['Conv_0']", "['Dense_0']"),
    ("vit", "['embed']", "['head']"),
])
def test_default_skip_keeps_the_first_and_last_multiplying_layers(name, first, last):
    model, variables, x = _model(name)
    skip = default_skip(model, variables, x)
    skipped = _skipped(variables["params"], skip)
    assert skipped and all(p.startswith((first, last)) for p in skipped)
    assert any(p.startswith(first) for p in skipped) and any(p.startswith(last) for p in skipped)
    # Dense_1 of the MLP, a ResNet block's conv, a ViT block's projections stay touched.
    assert len(skipped) < len(param_paths(variables["params"]))


def test_call_order_not_name_order():
    """Flax sorts parameters by name; the default follows the calls (here "b" runs first)."""

    class Reversed(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            return nn.Dense(10, name="a")(nn.relu(nn.Dense(8, name="m")(nn.Dense(16, name="b")(x))))

    model, x = Reversed(), jnp.zeros((1, 4))
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    assert layers_in_call_order(model, variables, x) == ["b", "m", "a"]
    assert default_skip(model, variables, x) == (r"^\['b'\]", r"^\['a'\]")


def test_patterns_match_paths_exactly_not_by_prefix_of_a_name():
    _, variables, _ = _model("mlp", hidden=(8,) * 11)  # Dense_0 ... Dense_11
    skipped = _skipped(variables["params"], (r"^\['Dense_1'\]",))
    assert skipped == ["['Dense_1']['bias']", "['Dense_1']['kernel']"]  # not Dense_10, Dense_11
    assert _skipped(variables["params"], ()) == []  # skip=() touches every layer
    assert _skipped(variables["params"], ("kernel",)) == [
        p for p in param_paths(variables["params"]) if p.endswith("['kernel']")]


def test_a_one_layer_model_skips_that_layer_once():
    model, variables, x = _model("logreg")
    assert len(default_skip(model, variables, x)) == 1
    assert np.all(~np.asarray(jax.tree.leaves(touched(variables["params"],
                                                      default_skip(model, variables, x)))))
