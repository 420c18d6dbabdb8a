"""A researcher's own module, data set, loss and optimizer composed with the techniques from
Python: each technique really applies to what was passed, or the run is refused in one line before
training; summary.json records what really ran, however it was applied."""

import json
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

from jaxopt_lab import (
    build_experiment,
    compress,
    distill,
    evaluate_run,
    load_run,
    prepare_dataset,
    prune,
    quantize,
    train_and_evaluate,
)
from jaxopt_lab.core.tasks import inference
from jaxopt_lab.errors import UserError
from tests.helpers import blobs, run_cli, tiny_config

STEPS = 30


class DenseNet(nn.Module):
    """A user's Dense-only module: it has the matmul seam and no conv seam."""

    num_classes: int
    hidden: int = 32
    dot_general_cls: Any = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        del train
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(self.hidden, dot_general_cls=self.dot_general_cls)(x))
        x = nn.relu(nn.Dense(self.hidden, dot_general_cls=self.dot_general_cls)(x))
        return nn.Dense(self.num_classes, dot_general_cls=self.dot_general_cls)(x)


def loss_with_apply_fn(params, model_state, batch, rng, hparams, *, apply_fn):
    """The user's loss, calling the composed model it is handed."""
    del rng, hparams
    logits = apply_fn({"params": params}, batch["x"], train=True)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    return loss, {"metrics": {}, "model_state": model_state, "logits": logits}


def loss_of_its_own_model(params, model_state, batch, rng, hparams):
    """A five-argument loss applying a module of its own: blind to the model seam."""
    del rng, hparams
    logits = DenseNet(3).apply({"params": params}, batch["x"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    return loss, {"metrics": {}, "model_state": model_state}


def _config(**techniques):
    config = tiny_config(steps=STEPS, measure=False)
    config.data.batch_size = 32
    for name, values in techniques.items():
        for key, value in values.items():
            config.techniques[name][key] = value
    return config


def _losses(workdir) -> list[float]:
    return [json.loads(line)["loss"]
            for line in (workdir / "metrics.jsonl").read_text().splitlines()]


QAT = {"method": "qat", "skip": ()}


def test_a_loss_with_apply_fn_trains_the_quantized_model_and_serves_it_bit_identically(tmp_path):
    objects = {"model": DenseNet(3), "dataset": blobs(), "loss_fn": loss_with_apply_fn}
    float_run = train_and_evaluate(_config(), str(tmp_path / "float"), **objects)
    qat_run = train_and_evaluate(_config(quantize=QAT), str(tmp_path / "qat"), **objects)
    assert "quantize" not in float_run["techniques"]
    assert qat_run["techniques"]["quantize"]["scheme"] == "w8a8"
    assert _losses(tmp_path / "float") != _losses(tmp_path / "qat")  # QAT really trained

    run = load_run(str(tmp_path / "qat"), **objects)
    variables = {"params": run.state.params, **run.state.model_state}
    x = blobs().test["x"][:64]
    serving = quantize.convert(run.experiment.model, variables, x)
    served = jax.jit(quantize.serve_fn(run.experiment.model))(serving, x)
    evaluated = jax.jit(inference(run.experiment.model))(variables, x)
    np.testing.assert_array_equal(np.asarray(served), np.asarray(evaluated))


def test_a_five_argument_loss_trains_alone_and_is_refused_with_a_model_technique(tmp_path):
    objects = {"model": DenseNet(3), "dataset": blobs(), "loss_fn": loss_of_its_own_model}
    assert train_and_evaluate(_config(), str(tmp_path / "plain"), **objects)["steps"] == STEPS
    with pytest.raises(UserError, match=r"^techniques.quantize changed the model, but loss_fn "
                                        r"'loss_of_its_own_model' applies a model of its own"):
        train_and_evaluate(_config(quantize=QAT), str(tmp_path / "qat"), **objects)
    assert not (tmp_path / "qat" / "checkpoints").exists()  # refused before training


def test_a_run_given_its_data_from_python_says_so_and_takes_them_again(tmp_path):
    objects = {"model": DenseNet(3), "dataset": blobs()}
    summary = train_and_evaluate(_config(), str(tmp_path), **objects)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["data"]["name"] == "from-python:blobs"
    with pytest.raises(UserError, match="trained on data set 'blobs' passed from Python"):
        load_run(str(tmp_path), model=DenseNet(3))
    again = evaluate_run(load_run(str(tmp_path), **objects), "test")
    assert again["test_accuracy"] == pytest.approx(summary["test_accuracy"])


def test_techniques_applied_from_python_are_recorded_and_read_the_float_model(tmp_path):
    dataset = blobs()
    wrapped = quantize.wrap(DenseNet(3), sample_x=dataset.train["x"][:2], skip=())
    tx = prune.wrap(optax.adam(1e-2), model=DenseNet(3), sample_x=dataset.train["x"][:2],
                    sparsity=0.5, begin_step=5, end_step=20, frequency=5)
    summary = train_and_evaluate(_config(), str(tmp_path / "python"), model=wrapped,
                                 dataset=dataset, tx=tx)
    assert set(summary["techniques"]) == {"quantize", "prune"}
    assert summary["techniques"]["prune"]["skip"] == ["^\\['Dense_0'\\]", "^\\['Dense_2'\\]"]
    assert summary["sparsity"] == pytest.approx(0.5, abs=0.01)
    # The config's pruning on a model the caller quantized: the default skip is read from the
    # float model, not emptied by AQT's ops.
    config = _config(prune={"method": "magnitude", "sparsity": 0.5, "end_step": 20})
    both = train_and_evaluate(config, str(tmp_path / "config"), model=wrapped, dataset=dataset)
    assert both["techniques"]["prune"]["skip"] == ["^\\['Dense_0'\\]", "^\\['Dense_2'\\]"]
    assert both["techniques"]["quantize"]["skip"] == []
    with pytest.raises(UserError, match="techniques.quantize is on in the config and already "
                                        "applied"):
        train_and_evaluate(_config(quantize=QAT), str(tmp_path / "twice"), model=wrapped,
                           dataset=dataset)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("teacher")
    train_and_evaluate(tiny_config(steps=STEPS, measure=False), str(workdir))
    return str(workdir)


def test_distillation_from_python_is_recorded_and_a_loss_without_logits_refused(teacher,
                                                                                tmp_path):
    config = tiny_config(steps=STEPS, measure=False)
    dataset = prepare_dataset(config)
    task_loss = build_experiment(config, dataset).loss_fn
    distilled = distill.wrap(task_loss, load_run(teacher), temperature=2.0, alpha=0.5)
    summary = train_and_evaluate(config, str(tmp_path / "python"), loss_fn=distilled)
    record = summary["techniques"]["distill"]
    assert (record["temperature"], record["alpha"], record["teacher"]) == (2.0, 0.5, teacher)
    assert "distill_soft_loss" in (tmp_path / "python" / "metrics.jsonl").read_text()

    def no_logits(params, model_state, batch, rng, hparams):
        loss, aux = task_loss(params, model_state, batch, rng, hparams)
        return loss, {k: v for k, v in aux.items() if k != "logits"}

    student = tiny_config(steps=STEPS, measure=False)
    student.techniques.distill.teacher = teacher
    with pytest.raises(UserError, match=r"^techniques.distill needs the student's outputs: "
                                        r"loss_fn 'no_logits' must return them as "
                                        r"aux\['logits'\]"):
        train_and_evaluate(student, str(tmp_path / "no_logits"), loss_fn=no_logits)


class TwoDense(nn.Module):
    num_classes: int
    dot_general_cls: Any = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        del train
        x = nn.relu(nn.Dense(16, dot_general_cls=self.dot_general_cls)(x))
        return nn.Dense(self.num_classes, dot_general_cls=self.dot_general_cls)(x)


def test_quantization_that_would_quantize_no_layer_is_refused(tmp_path):
    """The default skip leaves the first and last layers in float: on a two-layer module that is
    every layer, and a 'QAT' run would train in float."""
    with pytest.raises(UserError, match=r"^quantize: no layer is left to quantize"):
        train_and_evaluate(_config(quantize={"method": "qat"}), str(tmp_path),
                           model=TwoDense(3), dataset=blobs(), loss_fn=loss_with_apply_fn)
    summary = train_and_evaluate(_config(quantize=QAT), str(tmp_path / "all"), model=TwoDense(3),
                                 dataset=blobs(), loss_fn=loss_with_apply_fn)
    assert summary["techniques"]["quantize"]["skip"] == []


def test_the_cli_names_what_a_run_given_python_data_needs(tmp_path):
    train_and_evaluate(_config(), str(tmp_path), dataset=blobs())
    result = run_cli("eval", "--workdir", str(tmp_path))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "trained on data set 'blobs' passed from Python" in lines[0]


def test_a_compressing_reducer_from_python_is_recorded_and_hints_need_the_task_loss(teacher,
                                                                                   tmp_path):
    summary = train_and_evaluate(_config(), str(tmp_path / "topk"), model=DenseNet(3),
                                 dataset=blobs(), reducer=compress.topk(0.1))
    assert summary["techniques"]["compress"]["method"] == "topk"
    assert summary["techniques"]["compress"]["ratio"] == 0.1
    student = tiny_config(steps=STEPS, measure=False)
    student.techniques.distill.teacher = teacher
    student.techniques.distill.features = (("Dense_0", "Dense_0"),)
    with pytest.raises(UserError, match="distill features need the task's own loss"):
        train_and_evaluate(student, str(tmp_path / "hints"), loss_fn=loss_of_its_own_model)
