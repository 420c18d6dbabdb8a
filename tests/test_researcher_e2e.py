"""A researcher's script, end to end: their own module (one that declares its channel groups),
data set and loss; channel pruning + int8 QAT + distillation composed from Python; train,
resume, evaluate, shrink, quantize the shrunk run, export it and run the artifact."""

import json
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

from jaxopt_lab import evaluate_run, load_run, train_and_evaluate
from jaxopt_lab.export import deployed_form, export_run
from jaxopt_lab.models.channels import layer_slices, param_path, wire
from jaxopt_lab.workflows.convert import quantize_run
from jaxopt_lab.workflows.shrink import shrink_run
from tests.helpers import blobs, tiny_config


class Net(nn.Module):
    """Dense layers of `hidden` widths, describing its channels (`models.channels`)."""

    num_classes: int
    hidden: tuple[int, ...] = (32, 32)
    dot_general_cls: Any = None

    @nn.nowrap
    def channel_wiring(self):
        return tuple(wire(f"Dense_{i}", layer_slices(f"Dense_{i}", axis=1),
                          [(param_path(f"Dense_{i + 1}", "kernel"), 0)], "hidden", [i])
                     for i in range(len(self.hidden)))

    @nn.nowrap
    def layer_widths(self):
        return {"hidden": self.hidden}

    @nn.nowrap
    def with_layer_widths(self, **widths):
        return self.clone(**widths)

    @nn.compact
    def __call__(self, x, train: bool = False):
        del train
        x = x.reshape(x.shape[0], -1)
        for width in self.hidden:
            x = nn.relu(nn.Dense(width, dot_general_cls=self.dot_general_cls)(x))
        return nn.Dense(self.num_classes, dot_general_cls=self.dot_general_cls)(x)


def my_loss(params, model_state, batch, rng, hparams, *, apply_fn):
    """Cross-entropy on the composed model (quantized, here), with the outputs distillation
    reads."""
    del rng, hparams
    logits = apply_fn({"params": params}, batch["x"], train=True)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    accuracy = (logits.argmax(-1) == batch["label"]).mean()
    return loss, {"metrics": {"accuracy": accuracy}, "model_state": model_state,
                  "logits": logits}


def _config(steps: int):
    config = tiny_config(steps=steps, measure=False, eval_every=20, checkpoint_every=20)
    config.data.batch_size = 50
    config.optim.lr = 3e-3
    return config


def test_own_parts_composed_from_python_train_resume_shrink_quantize_export(tmp_path):
    data = blobs(classes=4, features=12, train=800, seed=1)
    teacher = str(tmp_path / "teacher")
    train_and_evaluate(_config(60), teacher, model=Net(4, hidden=(64, 64)), dataset=data,
                       loss_fn=my_loss)

    def student(steps):
        config = _config(steps)
        prune = config.techniques.prune
        prune.method, prune.pattern, prune.sparsity = "magnitude", "channels", 0.5
        prune.begin_step, prune.end_step, prune.frequency = 10, 40, 10
        config.techniques.quantize.method = "qat"
        config.techniques.quantize.skip = ()
        config.techniques.distill.teacher = teacher
        config.techniques.distill.alpha = 0.5
        return config

    objects = {"model": Net(4), "dataset": data, "loss_fn": my_loss}
    workdir = tmp_path / "student"
    first = train_and_evaluate(student(40), str(workdir), **objects)
    summary = train_and_evaluate(student(60), str(workdir), **objects)  # resumes
    assert first["steps"] == 40 and summary["resumed_from"] == 40 and summary["steps"] == 60
    assert set(summary["techniques"]) == {"quantize", "distill", "prune"}
    assert summary["techniques"]["distill"]["teacher"] == teacher
    records = (workdir / "metrics.jsonl").read_text()
    assert "distill_soft_loss" in records and "quantized_fraction" in records
    evaluated = evaluate_run(load_run(str(workdir), **objects), "test")
    assert evaluated["test_accuracy"] == pytest.approx(summary["test_accuracy"])
    assert summary["test_accuracy"] > 0.5  # chance is 0.25

    shrunk = shrink_run(str(workdir), **objects)
    assert [g["channels"] for g in shrunk["groups"]] == [32, 16]  # the first layer is skipped
    assert shrunk["max_abs_output_difference"] < 1e-3
    assert json.loads((workdir / "shrunk" / "config.json").read_text())["model"]["hidden"] == \
        [32, 16]

    # The shrunk run's model is its config's (the module at its new widths, by import path).
    rest = {k: v for k, v in objects.items() if k != "model"}
    quantized = quantize_run(str(workdir / "shrunk"), scheme="w8a8", **rest)
    assert quantized["method"] == "qat" and quantized["serving_bit_identical"]

    artifact = str(tmp_path / "student.stablehlo")
    metadata = export_run(str(workdir / "shrunk"), artifact, **rest)
    assert metadata["form"] == "w8a8 serving form"
    assert metadata["input"]["preprocessing"] == "as the data set gives them"
    with open(artifact, "rb") as f:
        exported = jax.export.deserialize(f.read())
    x = data.test["x"][:32]
    outputs = np.asarray(exported.call(x))
    served = load_run(str(workdir / "shrunk"), **rest)
    apply, variables, _ = deployed_form(served, str(workdir / "shrunk"))
    np.testing.assert_array_equal(outputs, np.asarray(jax.jit(apply)(variables, x)))
    assert (outputs.argmax(-1) == data.test["label"][:32]).mean() > 0.5
