"""`jaxopt-lab export`: the artifact loads and runs in a process that cannot import jaxopt_lab,
at batch sizes it was never traced with, and gives the framework's own outputs — for a float MLP,
a QAT CNN and that run's int8 serving form; bad input gets one line."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from helpers import run_cli, tiny_config

from jaxopt_lab import load_run, model_config, train_and_evaluate
from jaxopt_lab.core.state import model_params
from jaxopt_lab.core.tasks import inference
from jaxopt_lab.data.sources import PREPROCESSING
from jaxopt_lab.errors import UserError
from jaxopt_lab.export import export_run
from jaxopt_lab.techniques.quantize import serve_fn
from jaxopt_lab.workflows.convert import load_serving, quantize_run, serving_model

# Runs in a process where importing jaxopt_lab fails: only jax (and numpy) load the artifact.
LOAD = """
import sys
sys.modules["jaxopt_lab"] = None
import jax, numpy as np
artifact, inputs, out = sys.argv[1:]
with open(artifact, "rb") as f:
    model = jax.export.deserialize(bytearray(f.read()))
np.savez(out, *[np.asarray(model.call(x)) for x in np.load(inputs).values()])
"""


def _runs():
    qat = tiny_config("cnn1d", steps=10, measure=False)
    qat.model = model_config("cnn1d", channels=8)
    qat.techniques.quantize.method = "qat"
    return {"mlp": tiny_config("mlp", steps=10, measure=False), "qat": qat}


def _run_artifact(tmp_path, artifact: str, inputs: list[np.ndarray]) -> list[np.ndarray]:
    """The artifact's outputs for each of `inputs`, from one process that has only jax."""
    np.savez(tmp_path / "x.npz", *inputs)
    loaded = subprocess.run(
        [sys.executable, "-c", LOAD, artifact, str(tmp_path / "x.npz"), str(tmp_path / "y.npz")],
        capture_output=True, text=True, timeout=120, check=False,
        cwd=tmp_path)  # not the repository: no jaxopt_lab on the path
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    return list(np.load(tmp_path / "y.npz").values())


def _assert_same(got, want, what: str) -> None:
    assert got.shape == want.shape and want.shape[1:] == (10,), what
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=what)
    assert (got.argmax(-1) == want.argmax(-1)).all(), what


@pytest.mark.slow
def test_the_artifact_runs_without_jaxopt_lab_and_matches_the_framework(tmp_path):
    sizes = {}
    for name, config in _runs().items():
        workdir = str(tmp_path / name)
        train_and_evaluate(config, workdir)
        artifact = str(tmp_path / f"{name}.stablehlo")
        metadata = export_run(workdir, artifact)
        assert metadata["input"]["shape"][0] == "batch" and metadata["platforms"] == ["cpu"]
        assert metadata["input"]["preprocessing"] == PREPROCESSING["mnist1d"]
        assert metadata["form"] == "model"
        assert ("quantize" in metadata["techniques"]) == (name == "qat")
        sizes[name] = metadata["bytes"]

        run = load_run(workdir)
        variables = {"params": model_params(run.state.params), **run.state.model_state}
        own = jax.jit(inference(run.experiment.model))
        # Neither is the batch the run trained or evaluated with.
        inputs = [run.dataset.test["x"][:batch] for batch in (3, 300)]
        for x, got in zip(inputs, _run_artifact(tmp_path, artifact, inputs), strict=True):
            _assert_same(got, np.asarray(own(variables, x)), name)

    # The QAT run's int8 serving form, once `quantize` wrote it, is what "auto" exports.
    workdir = str(tmp_path / "qat")
    quantized = quantize_run(workdir)
    metadata = export_run(workdir, str(tmp_path / "served.stablehlo"))
    assert metadata["form"] == f"{quantized['scheme']} serving form"
    assert metadata["bytes"] < sizes["qat"]  # int8 weights inside, not float ones
    run = load_run(workdir)
    serve = jax.jit(serve_fn(serving_model(run, quantized)))
    serving = load_serving(os.path.join(workdir, "quantized", "serving"))
    x = run.dataset.test["x"][:300]
    (got,) = _run_artifact(tmp_path, str(tmp_path / "served.stablehlo"), [x])
    _assert_same(got, np.asarray(serve(serving, x)), "serving form")


def test_bad_exports_get_one_line(tmp_path):
    result = run_cli("export", "--workdir", str(tmp_path / "none"), "--out",
                     str(tmp_path / "m.stablehlo"))
    assert result.returncode == 2
    assert "holds no config.json" in result.stderr and "Traceback" not in result.stderr
    config = tiny_config("mlp", steps=2, measure=False)
    config.population = (("optim.lr", (1e-3, 1e-2)),)
    train_and_evaluate(config, str(tmp_path / "population"))
    with pytest.raises(UserError, match="holds a population of 2; choose one with --member"):
        export_run(str(tmp_path / "population"), str(tmp_path / "m.stablehlo"))
    with pytest.raises(UserError, match="holds a population of 2; choose one with --member"):
        export_run(str(tmp_path / "population"), str(tmp_path / "m.stablehlo"), member=2)
    with pytest.raises(UserError, match="--platforms gpu: allowed are"):
        export_run(str(tmp_path / "population"), str(tmp_path / "m.stablehlo"), ("gpu",))
    train_and_evaluate(tiny_config("mlp", steps=2, measure=False), str(tmp_path / "float"))
    with pytest.raises(UserError, match="has no serving form: run `jaxopt-lab quantize"):
        export_run(str(tmp_path / "float"), str(tmp_path / "m.stablehlo"), form="serving")
    assert not (tmp_path / "m.stablehlo").exists()
    with pytest.raises(UserError, match="--member 0: .* holds one run"):
        export_run(str(tmp_path / "float"), str(tmp_path / "m.stablehlo"), member=0)


def test_a_population_member_exports_as_its_own_model(tmp_path):
    config = tiny_config("mlp", steps=3, measure=False)
    config.population = (("optim.lr", (1e-3, 3e-1)),)
    train_and_evaluate(config, str(tmp_path / "population"))
    metadata = export_run(str(tmp_path / "population"), str(tmp_path / "m1.stablehlo"), member=1)
    assert metadata["member"] == 1 and metadata["form"] == "model"
    run = load_run(str(tmp_path / "population"))
    x = np.asarray(jax.random.normal(jax.random.key(0), (4, 40)))
    with open(tmp_path / "m1.stablehlo", "rb") as f:
        got = np.asarray(jax.export.deserialize(bytearray(f.read())).call(x))
    want = {i: inference(run.experiment.model)(
        {"params": model_params(jax.tree.map(lambda a, i=i: a[i], run.state.params))}, x)
        for i in (0, 1)}
    _assert_same(got, np.asarray(want[1]), "member 1")
    assert not np.allclose(want[0], want[1])  # the members differ: the slice matters
