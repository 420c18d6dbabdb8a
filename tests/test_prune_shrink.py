"""Structured pruning's surgery: per-layer widths in the models, channel groups, `prune.shrink`
(the shrunk model computes what the masked one did), and `jaxopt-lab shrink` on a run."""

from __future__ import annotations

import json
import math
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import run_cli, tiny_config

from jaxopt_lab import evaluate_run, load_config, load_run, model_config, train_and_evaluate
from jaxopt_lab.core.tasks import inference
from jaxopt_lab.errors import UserError
from jaxopt_lab.models import build_model
from jaxopt_lab.techniques.prune.groups import ChannelGroup, channel_groups
from jaxopt_lab.techniques.prune.shrink import shrink
from jaxopt_lab.workflows.shrink import shrink_run

NUM_CLASSES = 10
SIGNAL, IMAGE = (4, 40), (4, 8, 8, 1)


def _shapes(name: str, shape: tuple, **hparams) -> dict[str, tuple]:
    variables = jax.eval_shape(build_model(name, NUM_CLASSES, **hparams).init,
                               jax.random.key(0), jnp.zeros(shape))
    return {jax.tree_util.keystr(p): leaf.shape
            for p, leaf in jax.tree_util.tree_leaves_with_path(variables["params"])}


def _count(shapes: dict[str, tuple]) -> int:
    return sum(math.prod(s) for s in shapes.values())


@pytest.mark.parametrize(("name", "shape", "count"), [
    ("cnn1d", SIGNAL, 5_210), ("resnet", IMAGE, 272_186), ("vit", IMAGE, 69_194)])
def test_default_widths_keep_the_parameter_count(name, shape, count):
    assert _count(_shapes(name, shape)) == count


def test_per_layer_widths_give_the_expected_shapes():
    cnn = _shapes("cnn1d", SIGNAL, channels=(3, 4, 5))
    assert (cnn["['Conv_0']['kernel']"], cnn["['Conv_1']['kernel']"],
            cnn["['Conv_2']['kernel']"]) == ((5, 1, 3), (3, 3, 4), (3, 4, 5))
    assert cnn["['Dense_0']['kernel']"] == (5 * 5, NUM_CLASSES)  # length 5 × 5 channels

    resnet = _shapes("resnet", IMAGE, depth=8, stage_widths=(2, 3, 5), inner_widths=(1, 2, 4))
    assert resnet["['Conv_0']['kernel']"] == (3, 3, 1, 2)
    block = "['_BasicBlock_{}']['{}']['kernel']".format
    assert [resnet[block(b, conv)] for b in range(3) for conv in ("Conv_0", "Conv_1")] == [
        (3, 3, 2, 1), (3, 3, 1, 2), (3, 3, 2, 2), (3, 3, 2, 3), (3, 3, 3, 4), (3, 3, 4, 5)]
    assert (resnet[block(1, "Conv_2")], resnet[block(2, "Conv_2")]) == ((1, 1, 2, 3), (1, 1, 3, 5))
    assert resnet["['Dense_0']['kernel']"] == (5, NUM_CLASSES)

    vit = _shapes("vit", IMAGE, dim=16, depth=2, heads=4, layer_heads=(1, 3),
                  layer_mlp_dims=(5, 7))
    attention = "['TransformerBlock_{}']['MultiHeadDotProductAttention_0']['{}']['kernel']".format
    assert [vit[attention(i, "query")] for i in range(2)] == [(16, 1, 4), (16, 3, 4)]
    assert [vit[attention(i, "out")] for i in range(2)] == [(1, 4, 16), (3, 4, 16)]
    assert vit["['TransformerBlock_1']['Dense_0']['kernel']"] == (16, 7)
    assert vit["['TransformerBlock_1']['Dense_1']['kernel']"] == (7, 16)


def test_resnet_groups_follow_the_residual_streams():
    model = build_model("resnet", NUM_CLASSES, depth=8, width=4)
    params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(IMAGE))["params"]
    groups = {g.name: g for g in channel_groups(model, params)}
    assert list(groups) == ["stage 0 residual", "stage 1 residual", "stage 2 residual",
                            "_BasicBlock_0 inner", "_BasicBlock_1 inner", "_BasicBlock_2 inner"]
    assert [groups[f"stage {s} residual"].size for s in range(3)] == [4, 8, 16]
    assert set(groups["stage 1 residual"].members) == {
        (f"['_BasicBlock_1']['{layer}']['{leaf}']", axis)
        for layer, leaf, axis in [("Conv_2", "kernel", 3), ("BatchNorm_2", "scale", 0),
                                  ("BatchNorm_2", "bias", 0), ("Conv_1", "kernel", 3),
                                  ("BatchNorm_1", "scale", 0), ("BatchNorm_1", "bias", 0)]}
    assert "['Conv_0']['kernel']" in dict(groups["stage 0 residual"].members)


def test_vit_head_group_holds_q_k_v_and_out_rows():
    model = build_model("vit", NUM_CLASSES, dim=16, depth=1, mlp_dim=8)
    params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(IMAGE))["params"]
    heads = channel_groups(model, params)[0]
    attention = "['TransformerBlock_0']['MultiHeadDotProductAttention_0']"
    assert heads.size == 4 and dict(heads.members) == {
        **{f"{attention}['{n}']['kernel']": 1 for n in ("query", "key", "value")},
        **{f"{attention}['{n}']['bias']": 0 for n in ("query", "key", "value")},
        f"{attention}['out']['kernel']": 0}


def _prune(params: dict, groups: list[ChannelGroup], rng: np.random.Generator) -> dict:
    """`params` with random channels of random groups removed as the pruner does: every member's
    slice zeroed, never a whole group."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    flat = {jax.tree_util.keystr(p): np.array(leaf) for p, leaf in leaves}
    for group in groups:
        if rng.random() < 0.2:
            continue
        removed = rng.choice(group.size, rng.integers(1, group.size), replace=False)
        for p, axis in group.members:
            np.moveaxis(flat[p], axis, 0)[removed] = 0
    return jax.tree_util.tree_unflatten(treedef, [flat[jax.tree_util.keystr(p)]
                                                  for p, _ in leaves])


CASES = {
    "mlp": (SIGNAL, {"hidden": (12, 9)}),
    "residual mlp": (SIGNAL, {"hidden": (12, 12, 8), "residual": True}),
    "cnn1d": (SIGNAL, {"channels": (6, 7, 8)}),
    "cnn2d": (IMAGE, {"features": (5, 6)}),
    "resnet": (IMAGE, {"depth": 8, "width": 4}),
    "vit": (IMAGE, {"dim": 16, "depth": 2, "mlp_dim": 12}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_shrunk_model_computes_what_the_masked_one_did(case):
    shape, hparams = CASES[case]
    model = build_model(case.split()[-1], NUM_CLASSES, **hparams)
    x = jax.random.normal(jax.random.key(1), shape)
    variables = model.init(jax.random.key(0), x)
    rng = np.random.default_rng(0)
    if "batch_stats" in variables:  # running statistics away from their (0, 1) start
        variables["batch_stats"] = jax.tree_util.tree_map_with_path(
            lambda p, a: jnp.asarray(rng.normal(0, 0.1, a.shape) if "mean" in str(p)
                                     else rng.uniform(0.5, 1.5, a.shape), a.dtype),
            variables["batch_stats"])
    variables["params"] = _prune(variables["params"], channel_groups(model, variables["params"]),
                                 rng)

    smaller, small_variables = shrink(model, variables)
    expected = inference(model)(variables, x)
    assert jnp.abs(expected).max() > 0.1  # the outputs are not trivially zero
    np.testing.assert_allclose(inference(smaller)(small_variables, x), expected, atol=1e-5)
    assert _count({k: v.shape for k, v in _flat(small_variables["params"]).items()}) < _count(
        {k: v.shape for k, v in _flat(variables["params"]).items()})
    shapes = jax.eval_shape(smaller.init, jax.random.key(0), x)
    assert jax.tree.map(lambda a: a.shape, shapes) == jax.tree.map(np.shape, small_variables)


def _flat(tree) -> dict:
    return {jax.tree_util.keystr(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def test_a_channel_with_any_nonzero_member_is_kept():
    model = build_model("mlp", NUM_CLASSES, hidden=(6,))
    x = jax.random.normal(jax.random.key(1), SIGNAL)
    variables = model.init(jax.random.key(0), x)
    variables["params"]["Dense_0"]["kernel"] = variables["params"]["Dense_0"]["kernel"].at[:, 0].set(0)
    smaller, small_variables = shrink(model, variables)  # bias 0 is not zero: the neuron stays
    assert smaller.hidden == (6,)
    np.testing.assert_allclose(inference(smaller)(small_variables, x),
                               inference(model)(variables, x), atol=1e-6)


class _Stack(nn.Module):
    """A user's own model: three Dense layers, the hidden ones `width` wide."""

    num_classes: int
    width: int = 16

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(self.width)(x))
        x = nn.relu(nn.Dense(self.width, name="hidden")(x))
        return nn.Dense(self.num_classes)(x)


def test_generic_groups_of_a_users_model_leave_out_the_output_layer():
    x = jnp.zeros(SIGNAL)
    model = _Stack(NUM_CLASSES)
    params = model.init(jax.random.key(0), x)["params"]
    assert channel_groups(model, params) == [
        ChannelGroup("Dense_0", (("['Dense_0']['kernel']", 1), ("['Dense_0']['bias']", 0)), 16),
        ChannelGroup("hidden", (("['hidden']['kernel']", 1), ("['hidden']['bias']", 0)), 16)]
    # Hidden layers as wide as the output: only the call order tells which one writes it.
    narrow = _Stack(NUM_CLASSES, width=NUM_CLASSES)
    params = narrow.init(jax.random.key(0), x)["params"]
    with pytest.raises(UserError, match="3 layers are num_classes wide.*pass sample_x"):
        channel_groups(narrow, params)
    assert [g.name for g in channel_groups(narrow, params, sample_x=x)] == ["Dense_0", "hidden"]


def test_surgery_refuses_what_it_cannot_shrink_naming_it():
    x = jnp.zeros(SIGNAL)
    model = _Stack(NUM_CLASSES)
    with pytest.raises(UserError, match="_Stack is not a model surgery knows; allowed: the "
                                        "registry's MLP, CNN1D, CNN2D, ResNet, ViT"):
        shrink(model, model.init(jax.random.key(0), x))
    cnn = build_model("cnn1d", NUM_CLASSES, channels=4)
    with pytest.raises(UserError, match=r"Conv_0: the parameters have no \['Conv_0'\]\['kernel'\]"):
        shrink(cnn, model.init(jax.random.key(0), x))  # another model's parameters
    lm = build_model("transformer_lm", NUM_CLASSES, dim=8, depth=1, heads=2, mlp_dim=8)
    with pytest.raises(UserError, match="transformer_lm is not supported"):
        channel_groups(lm, {})
    # Pruning Dense_1 to the width of Dense_0 would switch on a residual the model never had.
    mlp = build_model("mlp", NUM_CLASSES, hidden=(4, 6), residual=True)
    variables = mlp.init(jax.random.key(0), x)
    variables["params"] = _prune_first(variables["params"], "Dense_1", 2)
    with pytest.raises(UserError, match="layer Dense_1 would gain a residual connection"):
        shrink(mlp, variables)


def _prune_first(params: dict, layer: str, count: int) -> dict:
    """`params` with the first `count` neurons of Dense layer `layer` removed."""
    return {**params, layer: {"kernel": params[layer]["kernel"].at[:, :count].set(0),
                              "bias": params[layer]["bias"].at[:count].set(0)}}


def _train_and_prune(workdir: str, **population) -> str:
    """A tiny cnn1d run (or population) whose convs lose half their channels to the pruner at
    step 5 of 10."""
    config = tiny_config("cnn1d", steps=10, measure=False)
    with config.unlocked():
        config.model = model_config("cnn1d", channels=8)
        config.population = tuple(population.items())
        config.techniques.prune.update(method="magnitude", pattern="channels", sparsity=0.5,
                                       schedule="one_shot", begin_step=5, skip=())
    train_and_evaluate(config, workdir)
    return workdir


@pytest.fixture(scope="module")
def pruned_run(tmp_path_factory) -> str:
    return _train_and_prune(str(tmp_path_factory.mktemp("runs") / "cnn"))


@pytest.mark.slow
def test_shrink_run_writes_a_run_that_loads_evaluates_and_fine_tunes(pruned_run, tmp_path):
    workdir = shutil.copytree(pruned_run, tmp_path / "run")
    summary = shrink_run(str(workdir))
    out = os.path.join(workdir, "shrunk")
    assert summary["model"]["channels"] == (4, 4, 4)
    assert [(g["channels"], g["of"]) for g in summary["groups"]] == [(4, 8)] * 3
    assert summary["max_abs_output_difference"] < 1e-5
    assert summary["test_accuracy"] == pytest.approx(summary["original_test_accuracy"], abs=1e-6)
    for key in ("num_params", "model_bytes", "flops_per_example"):
        assert summary[key] < summary[f"original_{key}"]
    assert summary["latency_ms_batch1"] > 0 and summary["latency_ms_batch256"] > 0
    with open(os.path.join(out, "summary.json")) as f:
        assert json.load(f) == json.loads(json.dumps(summary))
    shrunk = load_run(out)
    assert shrunk.step == 0 and list(shrunk.config.model.channels) == [4, 4, 4]
    assert shrunk.config.techniques.prune.method == "none"
    assert evaluate_run(shrunk)["test_accuracy"] == summary["test_accuracy"]
    with pytest.raises(UserError, match="already holds a run"):
        shrink_run(str(workdir))

    config = load_config(os.path.join(out, "config.py"), [
        "--config.train.steps=4", "--config.train.eval_every=4", "--config.train.log_every=2",
        "--config.train.checkpoint_every=4", "--config.train.measure=False"])
    tuned = train_and_evaluate(config, out)
    assert (tuned["resumed_from"], tuned["steps"], tuned["num_params"]) == (
        0, 4, summary["num_params"])
    # or a new run from the shrunk weights with a learning rate of its own: the config file keeps
    # the types of the keys it leaves unset, so they take overrides
    config = load_config(os.path.join(out, "config.py"), [
        "--config.train.steps=2", f"--config.train.init_from={out}", "--config.optim.lr=1e-4",
        "--config.train.float32_layers=('Conv_0',)", "--config.train.measure=False"])
    finetuned = train_and_evaluate(config, str(tmp_path / "finetuned"))
    assert finetuned["initialized_from"] == {"run": out, "step": 4}
    assert finetuned["num_params"] == summary["num_params"]


@pytest.mark.slow
def test_shrink_and_eval_from_the_cli(pruned_run, tmp_path):
    workdir = str(shutil.copytree(pruned_run, tmp_path / "run"))
    result = run_cli("shrink", "--workdir", workdir, "--member", "0")
    assert result.returncode == 2 and "holds one run, not a population" in result.stderr
    assert "Traceback" not in result.stderr
    result = run_cli("shrink", "--workdir", str(tmp_path / "none"))
    assert result.returncode == 2 and "holds no trained run" in result.stderr
    result = run_cli("shrink", "--workdir", workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(858 -> 338 parameters)" in result.stdout
    result = run_cli("eval", "--workdir", os.path.join(workdir, "shrunk"))
    assert result.returncode == 0, result.stderr[-3000:]
    with open(os.path.join(workdir, "shrunk", "summary.json")) as f:
        assert json.loads(result.stdout)["test_accuracy"] == json.load(f)["test_accuracy"]


@pytest.mark.slow
def test_a_population_member_shrinks_into_a_run_with_its_values(tmp_path):
    workdir = _train_and_prune(str(tmp_path / "population"), **{"optim.lr": (3e-3, 2e-2)})
    with pytest.raises(UserError, match="population of 2; choose one with --member"):
        shrink_run(workdir)
    summary = shrink_run(workdir, member=1)
    assert summary["member"] == 1 and summary["max_abs_output_difference"] < 1e-5
    shrunk = load_run(os.path.join(workdir, "shrunk"))
    assert (shrunk.config.optim.lr, shrunk.members) == (2e-2, [])
    assert summary["original_test_accuracy"] == pytest.approx(summary["test_accuracy"], abs=1e-6)
