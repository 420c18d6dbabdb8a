"""Models: shapes in both modes, the paper models' sizes and init, the quantization seams, errors."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from aqt.jax.v2 import aqt_conv_general
from aqt.jax.v2 import config as aqt_config
from aqt.jax.v2.flax import aqt_flax
from flax import traverse_util

from jaxopt_lab.errors import UserError
from jaxopt_lab.models import MODELS, build_model, model_hparams

NUM_CLASSES = 10
BATCH = 4
MNIST1D_MODELS = ("logreg", "mlp", "cnn1d")


SEQUENCE = 16  # tokens per example for the language model


def _input(name: str) -> jax.Array:
    """An MNIST-1D-shaped batch [B, 40], a digits-shaped batch [B, 8, 8, 1], or tokens [B, T]."""
    if name == "transformer_lm":
        return jax.random.randint(jax.random.key(1), (BATCH, SEQUENCE), 0, NUM_CLASSES)
    shape = (BATCH, 40) if name in MNIST1D_MODELS else (BATCH, 8, 8, 1)
    return jax.random.normal(jax.random.key(1), shape)


def _logits_shape(name: str) -> tuple[int, ...]:
    """One row of logits per example; the language model has one per token."""
    return (BATCH, SEQUENCE, NUM_CLASSES) if name == "transformer_lm" else (BATCH, NUM_CLASSES)


def _kernel_paths(params) -> set[tuple[str, ...]]:
    """Paths of the modules that hold a `kernel`: every Dense, DenseGeneral and Conv."""
    return {path[:-1] for path in traverse_util.flatten_dict(params) if path[-1] == "kernel"}


def _recording_dot_general(calls: list) -> type[nn.Module]:
    class RecordingDotGeneral(nn.Module):
        def __call__(
            self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None
        ):
            calls.append(self.path[:-1])  # the Dense that called it
            return jax.lax.dot_general(
                lhs,
                rhs,
                dimension_numbers,
                precision,
                preferred_element_type=preferred_element_type,
            )

    return RecordingDotGeneral


def _recording_conv(calls: list) -> type[nn.Module]:
    class RecordingConv(nn.Module):
        def __call__(self, *args, **kwargs):
            calls.append(self.path[:-1])  # the Conv that called it
            return jax.lax.conv_general_dilated(*args, **kwargs)

    return RecordingConv


def _aqt_int8() -> aqt_config.DotGeneral:
    # Deterministic rounding, so AqtDotGeneral with prng_name=None needs no RNG stream.
    return aqt_config.fully_quantized(fwd_bits=8, bwd_bits=8, use_stochastic_rounding=False)


# Smaller variants for the tests that compile: XLA:CPU takes seconds to compile a ResNet-20 or a
# ViT; their default sizes are still checked, through jax.eval_shape, which compiles nothing.
SMALL = {"resnet": {"depth": 8, "width": 4}, "resnet18": {"width": 4}, "vit": {"dim": 16, "depth": 1, "mlp_dim": 32},
         "transformer_lm": {"dim": 16, "depth": 1, "heads": 2, "mlp_dim": 32}}


@functools.cache
def _init(name: str) -> tuple[nn.Module, dict]:
    """The test-size float model `name` and its variables, initialised once per test session."""
    model = build_model(name, NUM_CLASSES, **SMALL.get(name, {}))
    # An rbg key: init compiles mostly random-number code, which XLA:CPU compiles faster for
    # RngBitGenerator than for threefry (about 15 % off this file's time).
    return model, jax.jit(model.init)(jax.random.key(0, impl="rbg"), _input(name))


@pytest.mark.parametrize("name", list(MODELS))
def test_default_size_logits_shape_in_train_and_eval(name):
    model, x = build_model(name, NUM_CLASSES), _input(name)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    assert ("batch_stats" in variables) == name.startswith("resnet")
    for train in (False, True):
        logits, _ = jax.eval_shape(
            functools.partial(model.apply, train=train, mutable=["batch_stats"]), variables, x
        )
        assert logits.shape == _logits_shape(name)


@pytest.mark.parametrize("name", list(MODELS))
def test_runs_in_train_and_eval(name):
    (model, variables), x = _init(name), _input(name)

    @jax.jit
    def run(variables):  # one compilation for both modes
        train_logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
        return model.apply(variables, x), train_logits, updates

    logits, train_logits, updates = run(variables)
    for out in (logits, train_logits):
        assert out.shape == _logits_shape(name)
        assert jnp.isfinite(out).all()
    if name.startswith("resnet"):  # training updates the running statistics; eval uses them
        assert not jnp.allclose(
            updates["batch_stats"]["BatchNorm_0"]["mean"],
            variables["batch_stats"]["BatchNorm_0"]["mean"],
        )
        assert not jnp.allclose(logits, train_logits)


def test_cnn1d_has_the_papers_parameter_count():
    params = jax.eval_shape(
        build_model("cnn1d", NUM_CLASSES).init, jax.random.key(0), _input("cnn1d")
    )
    sizes = {path: math.prod(p.shape) for path, p in traverse_util.flatten_dict(params).items()}
    assert sizes == {
        ("params", "Conv_0", "kernel"): 1 * 25 * 5,
        ("params", "Conv_0", "bias"): 25,
        ("params", "Conv_1", "kernel"): 25 * 25 * 3,
        ("params", "Conv_1", "bias"): 25,
        ("params", "Conv_2", "kernel"): 25 * 25 * 3,
        ("params", "Conv_2", "bias"): 25,
        ("params", "Dense_0", "kernel"): 125 * 10,
        ("params", "Dense_0", "bias"): 10,
    }


def test_resnet18_is_the_cifar_resnet18():
    """Four stages of two basic blocks at 64-512 channels with a 3×3 stem: 11,173,962 parameters
    for 10 classes, the count torchvision's resnet18 has once its stem is made 3×3 (kuangliu's
    pytorch-cifar ResNet18)."""
    model = build_model("resnet18", 10)
    x = jnp.zeros((1, 32, 32, 3))
    params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    assert sum(math.prod(p.shape) for p in jax.tree.leaves(params)) == 11_173_962
    assert params["Conv_0"]["kernel"].shape == (3, 3, 3, 64)
    blocks = sorted(k for k in params if k.startswith("_BasicBlock_"))
    assert len(blocks) == 8
    assert [params[b]["Conv_1"]["kernel"].shape[-1] for b in sorted(blocks, key=lambda k: int(
        k.rsplit("_", 1)[1]))] == [64, 64, 128, 128, 256, 256, 512, 512]


@pytest.mark.parametrize("name", MNIST1D_MODELS)
def test_paper_models_use_pytorch_init(name):
    """Kernels and biases ~ U(±1/sqrt(fan_in)), not Flax's LeCun-normal kernels and zero biases."""
    params = _init(name)[1]["params"]
    flat = traverse_util.flatten_dict(params)
    for layer in _kernel_paths(params):
        kernel, bias = flat[(*layer, "kernel")], flat[(*layer, "bias")]
        bound = 1 / math.sqrt(math.prod(kernel.shape[:-1]))  # fan_in = receptive field × inputs
        for p in (kernel, bias):
            assert jnp.abs(p).max() <= bound
            assert jnp.abs(p).max() > 0.5 * bound  # spread over the range; biases are not zero


@pytest.mark.parametrize("name", list(MODELS))
def test_seams_reach_every_layer_with_a_kernel(name):
    dot_calls, conv_calls = [], []
    model = build_model(
        name,
        NUM_CLASSES,
        dot_general_cls=_recording_dot_general(dot_calls),
        conv_general_dilated_cls=_recording_conv(conv_calls),
    )
    x = _input(name)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    dot_calls.clear(), conv_calls.clear()
    jax.eval_shape(functools.partial(model.apply, train=True, mutable=True), variables, x)

    # Each layer calls its seam exactly once per forward pass, and no layer is left out.
    assert len(set(dot_calls)) == len(dot_calls) and len(set(conv_calls)) == len(conv_calls)
    # Attention's own matmuls (QK^T, weights x V) have no kernel but reach the seam too.
    attention = {call for call in dot_calls if "DotGeneralEinsum" in call[-1]}
    assert set(dot_calls) | set(conv_calls) == _kernel_paths(variables["params"]) | attention
    expected_dense = {
        "logreg": 1,
        "mlp": 3,  # 40 → 100 → 100 → 10
        "cnn1d": 1,
        "cnn2d": 1,
        "resnet": 1,
        "resnet18": 1,
        "vit": 1 + 2 * (4 + 2 + 2) + 1,  # embed, depth × (q, k, v, out, 2 MLP, 2 attention), head
        "transformer_lm": 2 * (4 + 2 + 2) + 1,  # depth × (q, k, v, out, 2 MLP, 2 attention), head
    }
    assert len(dot_calls) == expected_dense[name]
    if name == "cnn1d":
        assert len(conv_calls) == 3


def _quantized_loss_and_grads(name: str, **seams) -> tuple[jax.Array, jax.Array, dict]:
    """(quantized loss, float loss, quantized gradients) at the float model's parameters."""
    x, params = _input(name), _init(name)[1]["params"]
    float_model, model = build_model(name, NUM_CLASSES), build_model(name, NUM_CLASSES, **seams)

    def loss(p, m):
        return (m.apply({"params": p}, x) ** 2).mean()

    @jax.jit
    def run(p):  # one compilation
        return jax.value_and_grad(loss)(p, model), loss(p, float_model)

    (q_loss, grads), f_loss = run(params)
    return q_loss, f_loss, grads


@pytest.mark.parametrize("name", ["mlp", "cnn1d"])
def test_aqt_int8_dot_general_trains(name):
    dot_general_cls = functools.partial(aqt_flax.AqtDotGeneral, _aqt_int8(), prng_name=None)
    # Same parameter tree as the float model: a float checkpoint loads into the quantized one.
    quantized_vars = jax.eval_shape(
        build_model(name, NUM_CLASSES, dot_general_cls=dot_general_cls).init,
        jax.random.key(0),
        _input(name),
    )
    assert jax.tree.structure(quantized_vars) == jax.tree.structure(_init(name)[1])

    q_loss, f_loss, grads = _quantized_loss_and_grads(name, dot_general_cls=dot_general_cls)
    assert q_loss != f_loss and jnp.isclose(q_loss, f_loss, rtol=0.05)
    assert all(jnp.isfinite(g).all() for g in jax.tree.leaves(grads))
    assert all(jnp.any(layer["kernel"]) for layer in grads.values())


def test_aqt_conv_quantizes_forward_but_passes_no_gradient():
    """Pins a finding: AqtConvGeneralDilated (aqtp 0.9.0) is for inference, not QAT.

    It needs a conv-specific forward config (calibration axes for a rank-3 input; `fully_quantized`
    alone fails an assertion), and it differentiates straight through `round` (it sets
    `apply_custom_vjp_on_jax = False`), so no gradient reaches the conv kernels or anything before.
    """
    cfg = _aqt_int8()
    cfg.fwd = aqt_conv_general.conv_general_dilated_make(1, lhs_bits=8, rhs_bits=8)
    conv_cls = functools.partial(aqt_flax.AqtConvGeneralDilated, cfg, prng_name=None)

    q_loss, f_loss, grads = _quantized_loss_and_grads("cnn1d", conv_general_dilated_cls=conv_cls)
    assert q_loss != f_loss and jnp.isclose(q_loss, f_loss, rtol=0.05)
    for conv in ("Conv_0", "Conv_1", "Conv_2"):
        assert not jnp.any(grads[conv]["kernel"])
    assert jnp.any(grads["Dense_0"]["kernel"])


def test_build_model_converts_config_lists_to_tuples():
    assert build_model("mlp", NUM_CLASSES, hidden=[64, 32]).hidden == (64, 32)
    # cnn1d.channels takes one width for every conv (as configs pass it) or one per conv.
    assert build_model("cnn1d", NUM_CLASSES, channels=[4, 5, 6]).channels == (4, 5, 6)
    assert build_model("cnn1d", NUM_CLASSES, channels=128).channels_per_conv == (128,) * 3


def test_residual_mlp_adds_the_skip_around_equal_width_layers():
    """The paper's MLPBase: h = relu(W1 x); h = h + relu(W2 h); logits = W3 h."""
    x = _input("mlp")
    params = build_model("mlp", NUM_CLASSES).init(jax.random.key(0), x)["params"]
    dense = [params[f"Dense_{i}"] for i in range(3)]
    h = jax.nn.relu(x.reshape(len(x), -1) @ dense[0]["kernel"] + dense[0]["bias"])
    h = h + jax.nn.relu(h @ dense[1]["kernel"] + dense[1]["bias"])
    expected = h @ dense[2]["kernel"] + dense[2]["bias"]

    residual = build_model("mlp", NUM_CLASSES, residual=True).apply({"params": params}, x)
    plain = build_model("mlp", NUM_CLASSES).apply({"params": params}, x)
    assert jnp.allclose(residual, expected, atol=1e-5)
    assert not jnp.allclose(plain, expected, atol=1e-3)


def test_model_hparams_lists_only_tunable_fields():
    assert model_hparams("mlp") == {"hidden": (100, 100), "residual": False}
    assert model_hparams("logreg") == {}
    assert model_hparams("resnet") == {"depth": 20, "width": 16, "stage_widths": (),
                                       "inner_widths": ()}
    for name in MODELS:
        assert not {
            "num_classes",
            "dot_general_cls",
            "conv_general_dilated_cls",
            "dtype",
            "remat",
            "parent",
            "name",
        } & set(model_hparams(name))


@pytest.mark.parametrize(
    ("name", "hparams", "match"),
    [
        ("transformer", {}, "model.name='transformer' is unknown; allowed: logreg, mlp"),
        (
            "mlp",
            {"width": 3},
            "model.width is not a hyperparameter of model 'mlp'; allowed: hidden, residual",
        ),
        ("logreg", {"hidden": (3,)}, "allowed: none"),
        ("mlp", {"hidden": "100"}, r"model.hidden='100' has the wrong type"),
        ("cnn1d", {"channels": 2.5}, "model.channels=2.5 has the wrong type"),
        ("cnn1d", {"channels": (8, 8.5, 8)}, r"allowed: a int like the default 25 or a tuple"),
        ("cnn1d", {"channels": (8, 8)}, r"model.channels=\(8, 8\) needs one width per conv"),
        ("resnet", {"depth": 8, "stage_widths": (4, 8)}, "model.stage_widths=.* needs 3 widths"),
        ("resnet", {"depth": 8, "inner_widths": (4,)}, "needs 3 widths for depth 8"),
        ("vit", {"depth": 2, "layer_heads": (4,)}, "model.layer_heads=.* needs one entry per"),
        ("resnet", {"depth": 18}, "model.depth=18 is not a CIFAR ResNet depth"),
        ("resnet18", {"stage_sizes": (2, 0)}, r"model.stage_sizes=\(2, 0\) needs one block count"),
        ("vit", {"pool": "max"}, "model.pool='max' is unknown; allowed: cls, mean"),
        ("vit", {"dim": 30, "heads": 4}, "model.dim=30 is not divisible by model.heads=4"),
    ],
)
def test_bad_config_is_a_user_error(name, hparams, match):
    with pytest.raises(UserError, match=match):
        build_model(name, NUM_CLASSES, **hparams)


def test_bad_num_classes_is_a_user_error():
    with pytest.raises(UserError, match="num_classes=0"):
        build_model("mlp", 0)


def test_vit_patch_size_must_divide_the_input():
    with pytest.raises(UserError, match="model.patch_size=3 does not divide the 8×8 input"):
        jax.eval_shape(
            build_model("vit", NUM_CLASSES, patch_size=3).init, jax.random.key(0), _input("vit")
        )
