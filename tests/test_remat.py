"""Rematerialisation: the same gradients and parameter paths as without it, and less memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import ROOT
from test_precision import SMALL, _batch

from jaxopt_lab.core.layers import default_skip
from jaxopt_lab.core.tasks import make_task
from jaxopt_lab.errors import UserError
from jaxopt_lab.models import MODELS, build_model
from jaxopt_lab.models.remat import check_remat, remat_choices


@pytest.mark.parametrize("remat", ["full", "dots_saveable"])
@pytest.mark.parametrize("name", list(MODELS))
def test_remat_gives_the_same_gradients_and_parameter_paths(name, remat):
    batch, task = _batch(name)
    grads, paths, skips = {}, {}, {}
    for mode in ("none", remat):
        model = build_model(name, 10, remat=mode, **SMALL.get(name, {}))
        variables = model.init(jax.random.key(0), batch["x"][:1])
        state = {k: v for k, v in variables.items() if k != "params"}
        loss_fn = make_task(task, model).loss_fn
        paths[mode] = jax.tree_util.tree_structure(variables)
        skips[mode] = default_skip(model, variables, batch["x"][:1])
        grads[mode] = jax.jit(jax.grad(lambda p, f=loss_fn, s=state: f(
            p, s, batch, jax.random.key(1), {})[0]))(variables["params"])
    assert paths["none"] == paths[remat] and skips["none"] == skips[remat]
    for a, b in zip(jax.tree.leaves(grads["none"]), jax.tree.leaves(grads[remat]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_remat_recomputes_the_blocks_in_the_backward_pass():
    """The backward pass of a remat'd ResNet runs each block's convs again."""
    batch, _ = _batch("resnet")
    counts = {}
    for mode in ("none", "full"):
        model = build_model("resnet", 10, remat=mode, depth=8, width=4)
        variables = model.init(jax.random.key(0), batch["x"][:1])
        loss_fn = make_task("classification", model).loss_fn
        state = {"batch_stats": variables["batch_stats"]}
        jaxpr = str(jax.make_jaxpr(jax.grad(lambda p, f=loss_fn, s=state: f(
            p, s, batch, jax.random.key(1), {})[0]))(variables["params"]))
        counts[mode] = jaxpr.count("conv_general_dilated")
    # The 3 blocks' forward convs (2, then 3 and 3 with the projections) run again; the stem,
    # outside every block, does not.
    assert counts["full"] == counts["none"] + 8


_MEMORY = """
import json, jax, jax.numpy as jnp, optax
from jaxopt_lab.core.distributed import data_mesh
from jaxopt_lab.core.measure import compiled_memory
from jaxopt_lab.core.state import create_train_state
from jaxopt_lab.core.step import make_train_step, pmean_reducer
from jaxopt_lab.core.tasks import make_task
from jaxopt_lab.models import build_model
batch = {"x": jnp.ones((32, 32, 32, 3)), "label": jnp.zeros((32,), jnp.int32)}
out = {}
for remat in ("none", "dots_saveable"):
    model = build_model("resnet", 10, remat=remat, depth=20, width=4)
    tx = optax.sgd(0.1)
    state = create_train_state(model, batch["x"][:1], tx, lambda p: (), 1, 0)
    step = make_train_step(make_task("classification", model).loss_fn, pmean_reducer(), tx,
                           data_mesh())
    out[remat] = compiled_memory(jax.jit(step, donate_argnums=0), state, batch)["peak_bytes"]
print(json.dumps(out))
"""


@pytest.mark.slow  # compiles two ResNet-20 steps in a subprocess (~35 s)
def test_remat_lowers_the_train_steps_memory_on_the_resnet():
    """XLA's buffer assignment of the compiled train step, as summary.json reports it. XLA:CPU's
    default scheduler favours concurrency over memory and shows little of the saving; with its
    memory-minimizing scheduler the ResNet-20's step needs clearly less with a remat policy."""
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_cpu_enable_concurrency_optimized_scheduler=false"
    env = dict(os.environ, XLA_FLAGS=flags.strip(), PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-c", _MEMORY], env=env, cwd=ROOT, text=True,
                            capture_output=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    memory = json.loads(result.stdout.strip().splitlines()[-1])
    assert memory["dots_saveable"] < 0.9 * memory["none"], memory


def test_remat_choices_are_policies_that_need_no_arguments():
    choices = remat_choices()
    assert choices[:2] == ("none", "full") and "dots_saveable" in choices
    assert "save_only_these_names" not in choices  # a factory: it needs names
    with pytest.raises(UserError, match="model.remat='sometimes' is unknown; allowed: none"):
        check_remat("sometimes", "model.remat")
    with pytest.raises(UserError, match="remat='save_only_these_names' is unknown"):
        build_model("mlp", 10, remat="save_only_these_names")
    model = build_model("mlp", 10, remat="nothing_saveable", dtype=jnp.bfloat16)
    assert (model.remat, model.dtype) == ("nothing_saveable", jnp.bfloat16)
