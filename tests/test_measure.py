"""Measurement: hand-counted FLOPs of matmuls, convs and control flow; bytes; latency; summary."""

import functools
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from aqt.jax.v2 import config as aqt_config
from aqt.jax.v2.flax import aqt_flax
from helpers import ROOT, xla_flags
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from jaxopt_lab.core.measure import (
    count_flops,
    flops_by_scope,
    latency_ms,
    measure_model,
    model_bytes,
)
from jaxopt_lab.models import build_model

MLP_FLOPS = 2 * (40 * 100 + 100 * 10)  # the 40 → 100 → 10 MLP, per example
# cnn1d on a length-40 signal, one channel in, 25 channels per conv; out = (L + 2p - k) // s + 1:
CNN1D_FLOPS = {
    "Conv_0": 2 * 19 * 25 * (5 * 1),  # k5 s2 p1: (40 + 2 - 5) // 2 + 1 = 19 positions
    "Conv_1": 2 * 10 * 25 * (3 * 25),  # k3 s2 p1: (19 + 2 - 3) // 2 + 1 = 10
    "Conv_2": 2 * 5 * 25 * (3 * 25),  # k3 s2 p1: (10 + 2 - 3) // 2 + 1 = 5
    "Dense_0": 2 * (5 * 25) * 10,  # flattened 125 → 10 logits
}


def _apply_flops(model: nn.Module, x: jax.Array) -> int:
    variables = model.init(jax.random.key(0), x)
    return count_flops(model.apply, variables, x)


class TwoLayer(nn.Module):
    """A user's own MLP, 40 → 100 → 10, with no project code."""

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train
        return nn.Dense(10)(nn.relu(nn.Dense(100)(x)))


class Block(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Dense(4)(x)
        return nn.Dense(6)(x)


class Nested(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Dense(2)(Block()(x))


class NoisyBN(nn.Module):
    """BatchNorm statistics to size, and a "params" rng drawn at apply time, as AQT layers do."""

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = x + 0.0 * jax.random.normal(self.make_rng("params"), x.shape)
        x = nn.BatchNorm(use_running_average=not train)(nn.Dense(8)(x))
        return nn.Dense(3)(x)


def test_dense_counts_two_flops_per_multiply_accumulate():
    assert _apply_flops(nn.Dense(7), jnp.ones((3, 5))) == 2 * 3 * 5 * 7


@pytest.mark.parametrize(
    "model", [build_model("mlp", 10, hidden=(100,)), TwoLayer()], ids=["project", "user"]
)
@pytest.mark.parametrize("batch", [1, 4])
def test_mlp_counts_per_example_times_batch(model, batch):
    assert _apply_flops(model, jnp.ones((batch, 40))) == batch * MLP_FLOPS


@pytest.mark.parametrize(
    ("conv", "shape", "expected"),
    [
        # 1-D, stride 2, SAME: ceil(10 / 2) = 5 positions × 4 features × 3 taps × 2 inputs.
        (nn.Conv(4, (3,), strides=2, padding="SAME"), (1, 10, 2), 2 * 5 * 4 * (3 * 2)),
        # 1-D, VALID, kernel dilated to span 5: 10 - 5 + 1 = 6 positions.
        (nn.Conv(4, (3,), kernel_dilation=2, padding="VALID"), (1, 10, 2), 2 * 6 * 4 * (3 * 2)),
        # 2-D, stride 2, SAME on 9×9: 5×5 positions, batch 2, a 3×3 window over 4 inputs.
        (nn.Conv(8, (3, 3), strides=2, padding="SAME"), (2, 9, 9, 4), 2 * 2 * 25 * 8 * (9 * 4)),
        # 2-D, stride 2, VALID: (9 - 3) // 2 + 1 = 4, so 4×4 positions.
        (nn.Conv(8, (3, 3), strides=2, padding="VALID"), (2, 9, 9, 4), 2 * 2 * 16 * 8 * (9 * 4)),
        # 2 groups: each output feature reads 4 / 2 = 2 inputs; VALID stride 1 gives 7×7.
        (
            nn.Conv(8, (3, 3), feature_group_count=2, padding="VALID"),
            (2, 9, 9, 4),
            2 * 2 * 49 * 8 * (9 * 2),
        ),
        # Depthwise: one input per output feature.
        (nn.Conv(4, (3, 3), feature_group_count=4), (1, 6, 6, 4), 2 * 36 * 4 * (9 * 1)),
    ],
)
def test_conv_counts_output_elements_times_window_times_inputs_per_group(conv, shape, expected):
    assert _apply_flops(conv, jnp.ones(shape)) == expected


def test_cnn1d_matches_the_hand_count_layer_by_layer():
    model, x = build_model("cnn1d", 10), jnp.ones((2, 40))
    variables = model.init(jax.random.key(0), x)
    assert flops_by_scope(model.apply, variables, x[:1]) == CNN1D_FLOPS
    assert count_flops(model.apply, variables, x) == 2 * sum(CNN1D_FLOPS.values())


def _body(c, _):
    return c @ c, None


def _custom_jvp_square(y):
    f = jax.custom_jvp(lambda y: y @ y)
    f.defjvp(lambda primals, tangents: (f(primals[0]), tangents[0]))
    return f(y)


def _custom_vjp_square(y):
    f = jax.custom_vjp(lambda y: y @ y)
    f.defvjp(lambda y: (y @ y, None), lambda _, g: (g,))
    return f(y)


SQUARE = 2 * 4 * 4 * 4  # one (4, 4) @ (4, 4)


@pytest.mark.parametrize(
    ("fn", "expected"),
    [
        (lambda x: jax.lax.scan(_body, x, None, length=5)[0], 5 * SQUARE),
        (lambda x: jax.jit(lambda y: y @ y)(x), SQUARE),
        (lambda x: jax.checkpoint(lambda y: y @ y)(x) + x @ x, 2 * SQUARE),
        (_custom_jvp_square, SQUARE),
        (_custom_vjp_square, SQUARE),
        # The expensive branch counts, not the sum of both.
        (lambda x: jax.lax.cond(x[0, 0] > 0, lambda y: y @ y @ y, lambda y: y @ y, x), 2 * SQUARE),
        # A while loop's trip count is unknown: its body counts once.
        (lambda x: jax.lax.while_loop(lambda c: c[0, 0] < 9, lambda c: c @ c, x), SQUARE),
        # Sub-jaxprs nest: a jitted scan of a cond.
        (
            jax.jit(
                lambda x: jax.lax.scan(
                    lambda c, _: (jax.lax.cond(True, lambda y: y @ y, lambda y: y, c), None),
                    x,
                    None,
                    length=3,
                )[0]
            ),
            3 * SQUARE,
        ),
    ],
    ids=["scan", "jit", "remat", "custom_jvp", "custom_vjp", "cond", "while", "nested"],
)
def test_control_flow(fn, expected):
    assert count_flops(fn, jnp.ones((4, 4))) == expected


def test_vmap_counts_the_batch():
    lhs, rhs = jax.ShapeDtypeStruct((6, 3, 4), jnp.float32), jnp.ones((6, 4, 5))
    assert count_flops(jax.vmap(jnp.dot), lhs, rhs) == 2 * 6 * 3 * 4 * 5


PER_DEVICE = 2 * 2 * 2 * 4  # a (2, 4) shard @ its (4, 2) transpose


def test_shard_map_counts_every_device_of_its_manual_axes():
    x = jax.ShapeDtypeStruct((8, 4), jnp.float32)
    sharded = jax.shard_map(
        lambda y: y @ y.T, mesh=AbstractMesh((4,), ("d",)), in_specs=P("d"), out_specs=P("d")
    )
    assert count_flops(sharded, x) == 4 * PER_DEVICE
    # Manual over "d" only: the body runs once per "d" device, whatever the size of the auto "m".
    mesh = AbstractMesh((4, 2), ("d", "m"))
    partial = jax.shard_map(
        lambda y: y @ y.T, mesh=mesh, in_specs=P("d"), out_specs=P("d"), axis_names={"d"}
    )
    assert count_flops(partial, x) == 4 * PER_DEVICE
    # Nested, "m" made manual inside: a (1, 4) row @ its transpose on each of the 4 × 2 devices.
    inner = jax.shard_map(lambda z: z @ z.T, in_specs=P("m"), out_specs=P("m"), axis_names={"m"})
    nested = jax.shard_map(inner, mesh=mesh, in_specs=P("d"), out_specs=P("d"), axis_names={"d"})
    assert count_flops(nested, x) == 4 * 2 * (2 * 1 * 1 * 4)


@pytest.mark.slow  # a subprocess
def test_pmap_counts_every_device():
    """pmap over 4 devices, where there are 4: newer JAX traces pmap as a shard_map over the real
    devices, so unlike shard_map on an abstract mesh it cannot be traced for more than exist."""
    code = (
        "import jax, jax.numpy as jnp\n"
        "from jaxopt_lab.core.measure import count_flops\n"
        "x = jax.ShapeDtypeStruct((4, 2, 4), jnp.float32)\n"
        "print(count_flops(jax.pmap(lambda y: y @ y.T), x))\n"
    )
    env = dict(os.environ, XLA_FLAGS=xla_flags(4))
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert int(result.stdout.split()[-1]) == 4 * PER_DEVICE


def test_kwargs_are_static():
    model, x = build_model("mlp", 10, hidden=(100,)), jnp.ones((1, 40))
    variables = model.init(jax.random.key(0), x)
    assert count_flops(model.apply, variables, x, train=False) == MLP_FLOPS


def test_flops_by_scope_names_modules_and_sums_to_the_total():
    model, x = build_model("mlp", 10, hidden=(100,)), jnp.ones((1, 40))
    variables = model.init(jax.random.key(0), x)
    # The project's MLP calls Dense through a method (`_dense`), which Flax also names.
    assert flops_by_scope(model.apply, variables, x) == {
        "Dense_0": 2 * 40 * 100,
        "Dense_1": 2 * 100 * 10,
    }
    nested = Nested()
    variables = nested.init(jax.random.key(0), x)
    by_scope = flops_by_scope(jax.jit(nested.apply), variables, x)
    assert by_scope == {
        "Block_0/Dense_0": 2 * 40 * 4,
        "Block_0/Dense_1": 2 * 4 * 6,
        "Dense_0": 2 * 6 * 2,
    }
    assert sum(by_scope.values()) == count_flops(nested.apply, variables, x)
    # Ops of no module fall under "".
    assert flops_by_scope(lambda y: y @ y.T, x) == {"": 2 * 40}


def test_model_bytes():
    assert model_bytes({"w": jnp.zeros((3, 4)), "b": np.zeros(4, np.float32)}) == 4 * 16
    assert model_bytes(jnp.zeros(7, jnp.int8)) == 7
    assert model_bytes(jnp.zeros(5, jnp.int4)) == 3  # packed 2 per byte, rounded up
    assert model_bytes([jnp.zeros(5, jnp.uint4), jnp.zeros(4, jnp.int4)]) == 3 + 2  # per array
    assert model_bytes(jnp.zeros(6, jnp.float4_e2m1fn)) == 3
    assert model_bytes(jnp.zeros(3, jnp.bfloat16)) == 6
    assert model_bytes({"step": 3, "scale": 0.5, "none": None}) == 0
    model, x = build_model("mlp", 10, hidden=(100,)), jnp.ones((1, 40))
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)
    assert isinstance(jax.tree.leaves(shapes)[0], jax.ShapeDtypeStruct)
    assert model_bytes(shapes) == 4 * (40 * 100 + 100 + 100 * 10 + 10)
    assert model_bytes(shapes) == model_bytes(model.init(jax.random.key(0), x))


def test_latency_ms_is_a_positive_time():
    ms = latency_ms(lambda x: x @ jnp.ones((40, 10)), jnp.ones((1, 40)), 8, runs=3)
    assert isinstance(ms, float) and 0 < ms < 1e3
    # With `variables`, they are an argument of the compiled function, not a constant in it.
    ms = latency_ms(lambda v, x: x @ v, jnp.ones((1, 40)), 8, variables=jnp.ones((40, 10)))
    assert isinstance(ms, float) and 0 < ms < 1e3


def test_measure_model_mlp():
    model, x = build_model("mlp", 10, hidden=(100,)), jnp.ones((1, 40))
    variables = model.init(jax.random.key(0), x)
    summary = measure_model(model, variables, x)
    assert set(summary) == {
        "model_bytes",
        "flops_per_example",
        "latency_ms_batch1",
        "latency_ms_batch256",
    }
    assert summary["model_bytes"] == 4 * (40 * 100 + 100 + 100 * 10 + 10)
    assert summary["flops_per_example"] == MLP_FLOPS
    assert 0 < summary["latency_ms_batch1"] < 1e3 and 0 < summary["latency_ms_batch256"] < 1e3


def test_measure_model_counts_batch_stats_and_passes_a_params_rng():
    model, x = NoisyBN(), jnp.ones((1, 5))
    variables = model.init(jax.random.key(0), x)
    summary = measure_model(model, variables, x, batch_sizes=(2,))
    params = 5 * 8 + 8 + 2 * 8 + 8 * 3 + 3  # Dense, BatchNorm scale and bias, Dense
    assert summary["model_bytes"] == 4 * (params + 2 * 8)  # + running mean and variance
    assert summary["flops_per_example"] == 2 * (5 * 8 + 8 * 3)
    assert set(summary) == {"model_bytes", "flops_per_example", "latency_ms_batch2"}


def test_aqt_int8_mlp_counts_as_many_flops_as_float():
    """AQT draws a "params" rng at apply time; its int8 matmuls are the same multiply-adds."""
    cfg = aqt_config.fully_quantized(fwd_bits=8, bwd_bits=8, use_stochastic_rounding=False)
    model = build_model(
        "mlp", 10, hidden=(100,), dot_general_cls=functools.partial(aqt_flax.AqtDotGeneral, cfg)
    )
    x = jnp.ones((1, 40))
    variables = model.init(jax.random.key(0), x)
    summary = measure_model(model, variables, x, batch_sizes=(1,))
    assert summary["flops_per_example"] == MLP_FLOPS
    assert summary["model_bytes"] == 4 * (40 * 100 + 100 + 100 * 10 + 10)
