"""Bring your own model, data and loss: from Python, after kill -9, on 4 devices, and by import
path from the CLI with a package that lives outside this one.

The user's code is a small package written by the test into a temporary directory (`byo_ext`):
a Flax module, a data loader and a loss of the seam's signature whose weight decay comes from
`hparams`. Subprocesses find it through PYTHONPATH, exactly as a user's own package would be.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from helpers import ROOT, run_cli, tiny_config, xla_flags

from jaxopt_lab import train_and_evaluate
from jaxopt_lab.core.metrics import read_metrics
from jaxopt_lab.errors import UserError

PACKAGE = {
    "__init__.py": "",
    "nets.py": '''
        import flax.linen as nn

        class Net(nn.Module):
            """Not in the registry: two Dense layers, no seams, no `train` argument."""
            num_classes: int
            width: int = 32

            @nn.compact
            def __call__(self, x):
                return nn.Dense(self.num_classes)(nn.tanh(nn.Dense(self.width)(x)))
    ''',
    "data.py": '''
        import numpy as np
        from jaxopt_lab.data.sources import Dataset

        def load():
            """Points in 8-D labelled by the sign of two of their coordinates: 4 classes."""
            rng = np.random.default_rng(0)
            def split(n):
                x = rng.standard_normal((n, 8)).astype(np.float32)
                label = (2 * (x[:, 0] > 0) + (x[:, 1] > 0)).astype(np.int32)
                return {"x": x, "label": label}
            return Dataset(train=split(512), test=split(256), num_classes=4, input_shape=(8,),
                           name="quadrants")
    ''',
    "losses.py": '''
        import jax
        import jax.numpy as jnp
        import optax

        def make_loss(model):
            def loss_fn(params, model_state, batch, rng, hparams):
                del rng
                logits = model.apply({"params": params}, batch["x"])
                ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
                l2 = sum(jnp.sum(p ** 2) for p in jax.tree.leaves(params))
                accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
                return jnp.mean(ce) + hparams["l2"] * l2, {
                    "metrics": {"accuracy": accuracy}, "model_state": model_state}
            return loss_fn
    ''',
    "train.py": '''
        """python -m byo_ext.train WORKDIR STEPS: the user's own script."""
        import json, sys
        from jaxopt_lab import default_config, validate
        from jaxopt_lab import train_and_evaluate
        from byo_ext.data import load
        from byo_ext.losses import make_loss
        from byo_ext.nets import Net

        def config(steps):
            c = default_config()
            c.train.steps = steps
            c.train.log_every = 20
            c.train.eval_every = steps
            c.train.checkpoint_every = 200
            c.train.steps_per_call = 1
            c.train.progress = False
            c.train.measure = False
            c.data.batch_size = 32
            c.optim.lr = 3e-3
            validate(c)
            return c

        if __name__ == "__main__":
            model = Net(num_classes=4)
            summary = train_and_evaluate(config(int(sys.argv[2])), sys.argv[1], model=model,
                                         dataset=load(), loss_fn=make_loss(model),
                                         hparams={"l2": 1e-4})
            print(json.dumps(summary))
    ''',
}


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    root = tmp_path_factory.mktemp("user_code")
    (root / "byo_ext").mkdir()
    for name, text in PACKAGE.items():
        (root / "byo_ext" / name).write_text(textwrap.dedent(text))
    sys.path.insert(0, str(root))
    yield root
    sys.path.remove(str(root))
    for name in [m for m in sys.modules if m.startswith("byo_ext")]:
        del sys.modules[name]


def _env(package, devices: int = 1) -> dict:
    return dict(os.environ, PYTHONPATH=f"{package}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
                XLA_FLAGS=xla_flags(devices))


def _script(package, workdir, steps: int, devices: int = 1, **popen):
    return subprocess.Popen([sys.executable, "-m", "byo_ext.train", str(workdir), str(steps)],
                            cwd=ROOT, env=_env(package, devices), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)


def _finish(proc) -> dict:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def test_own_model_data_and_loss_train_from_python_and_resume(package, tmp_path):
    from byo_ext.data import load
    from byo_ext.losses import make_loss
    from byo_ext.nets import Net
    from byo_ext.train import config

    model = Net(num_classes=4)
    objects = {"model": model, "dataset": load(), "loss_fn": make_loss(model),
               "hparams": {"l2": 1e-4}}
    first = train_and_evaluate(config(200), str(tmp_path), **objects)
    assert first["test_accuracy"] > 0.5  # chance is 0.25
    assert first["num_params"] == 8 * 32 + 32 + 32 * 4 + 4
    assert first["validation_accuracy"] > 0.5  # 10 % of train held out by default
    # The same objects again, with more steps: it resumes from the checkpoint at 200.
    longer = train_and_evaluate(config(400), str(tmp_path), **objects)
    assert longer["resumed_from"] == 200 and longer["steps"] == 400
    # config.json names the module that was trained, so the run can be rebuilt from it.
    recorded = json.loads((tmp_path / "config.json").read_text())["model"]
    assert recorded == {"name": "byo_ext.nets:Net", "width": 32}
    # A different model on the same run directory: one line, not a restore of the wrong shapes.
    wider = Net(num_classes=4, width=64)
    with pytest.raises(UserError, match="holds a run of model 'byo_ext.nets:Net' \\(width=32\\)"):
        train_and_evaluate(config(600), str(tmp_path), **{**objects, "model": wider,
                                                          "loss_fn": make_loss(wider)})


def test_a_loss_of_the_wrong_signature_gets_one_line(package, tmp_path):
    from byo_ext.data import load
    from byo_ext.train import config

    def old_loss(params, model_state, batch, rng):  # no hparams
        raise AssertionError("never traced")

    with pytest.raises(UserError, match=r"must take \(params, model_state, batch, rng, hparams\)"):
        train_and_evaluate(config(10), str(tmp_path), dataset=load(), loss_fn=old_loss)


@pytest.mark.slow
def test_own_code_resumes_exactly_after_kill_9_and_agrees_on_four_devices(package, tmp_path):
    steps = 3000
    reference = _script(package, tmp_path / "reference", steps)
    four = _script(package, tmp_path / "four", steps, devices=4)
    workdir = tmp_path / "killed"
    victim = _script(package, workdir, steps)
    try:
        deadline = time.monotonic() + 180
        while not ((workdir / "checkpoints" / "200").is_dir() and read_metrics(str(workdir))
                   and read_metrics(str(workdir))[-1]["step"] > 200):
            assert victim.poll() is None, victim.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no checkpoint in time"
            time.sleep(0.02)
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(timeout=30)
    finally:
        if victim.poll() is None:
            victim.kill()
    assert not (workdir / "summary.json").exists(), "the run finished before it was killed"

    resumed = _finish(_script(package, workdir, steps))
    want = _finish(reference)
    assert resumed["resumed_from"] is not None and resumed["resumed_from"] % 200 == 0
    for key in ("validation_loss", "test_loss", "test_accuracy"):
        assert resumed[key] == pytest.approx(want[key], rel=1e-6, abs=1e-9), key
    records, expected = read_metrics(str(workdir)), read_metrics(str(tmp_path / "reference"))
    assert [r["step"] for r in records] == [r["step"] for r in expected]
    assert records[-1]["loss"] == pytest.approx(expected[-1]["loss"], rel=1e-6)

    on_four = _finish(four)
    assert on_four["devices"] == 4
    assert on_four["test_accuracy"] == pytest.approx(want["test_accuracy"], abs=0.02)
    assert on_four["test_loss"] == pytest.approx(want["test_loss"], rel=0.02)


def test_import_paths_from_the_cli_with_a_package_outside_this_one(package, tmp_path):
    result = run_cli("train", "--config", "configs/smoke.py", "--workdir", str(tmp_path / "run"),
                     "--config.model.name=byo_ext.nets:Net", "--config.model.width=16",
                     "--config.data.name=byo_ext.data:load", "--config.data.batch_size=32",
                     "--config.train.steps=40", "--config.train.eval_every=40",
                     "--config.train.checkpoint_every=40", "--config.train.log_every=20",
                     env={"PYTHONPATH": str(package)})
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["num_params"] == 8 * 16 + 16 + 16 * 4 + 4
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["model"] == {"name": "byo_ext.nets:Net", "width": 16}
    evaluated = run_cli("eval", "--workdir", str(tmp_path / "run"), "--split", "test",
                        env={"PYTHONPATH": str(package)})
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert json.loads(evaluated.stdout.strip().splitlines()[-1])["test_accuracy"] == \
        pytest.approx(summary["test_accuracy"], abs=1e-6)


@pytest.mark.parametrize("override, message", [
    ("--config.model.name=byo_ext.nets:Nope", "module 'byo_ext.nets' has no 'Nope'"),
    ("--config.model.name=no_such_pkg.nets:Net", "cannot import module 'no_such_pkg.nets'"),
    ("--config.data.name=byo_ext.data:nope", "module 'byo_ext.data' has no 'nope'"),
    ("--config.model.name=byo_ext.data:load", "is not a flax.linen Module class"),
])
def test_a_bad_import_path_is_one_line_naming_it(package, tmp_path, override, message):
    result = run_cli("train", "--config", "configs/smoke.py", "--workdir", str(tmp_path / "run"),
                     override, env={"PYTHONPATH": str(package)})
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.stderr, lines


def test_a_user_dataset_can_be_a_mapping_of_data_sources(tmp_path):
    """What `tfds.data_source(...)` returns, or grain sources: split name -> random access."""
    rng = np.random.default_rng(0)

    class Source:  # the random-access protocol grain and TFDS data sources share
        def __init__(self, n):
            self.records = [{"x": rng.standard_normal(40).astype(np.float32),
                             "label": np.int64(i % 10)} for i in range(n)]

        def __len__(self):
            return len(self.records)

        def __getitem__(self, i):
            return self.records[i]

    config = tiny_config("mlp", steps=10, measure=False)
    summary = train_and_evaluate(config, str(tmp_path), dataset={"train": Source(300),
                                                                 "test": Source(100)})
    assert summary["steps"] == 10 and 0 <= summary["test_accuracy"] <= 1
