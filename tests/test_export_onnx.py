"""`jaxopt-lab export --to onnx`: every registry model, and a run's static int8 form with the
run's own int8 weights and scales, run by a client (examples/onnx_client.py) in a process where
importing jaxopt_lab, jax and flax fails, in ONNX Runtime and OpenVINO, gives the framework's own
outputs; ONNX Runtime runs the int8 form with its int8 kernels; bad input gets one line."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import onnx
import pytest
from helpers import ROOT, run_cli, tiny_config
from jax.extend.core import Primitive
from jax.interpreters import mlir
from onnx import numpy_helper

from jaxopt_lab import load_run, model_config, train_and_evaluate
from jaxopt_lab.core.tasks import stateless_inference
from jaxopt_lab.errors import UserError
from jaxopt_lab.export import export_run
from jaxopt_lab.export.bench import serve_bench
from jaxopt_lab.export.onnx import write_onnx
from jaxopt_lab.export.qdq import quantized_layers
from jaxopt_lab.export.runtimes import RUNTIMES, load_onnx
from jaxopt_lab.models import MODELS, build_model
from jaxopt_lab.techniques.quantize import serve_fn
from jaxopt_lab.workflows.convert import load_serving, quantize_run, serving_model

CLIENT = ROOT / "examples" / "onnx_client.py"
BLOCKED = ("jax", "jaxlib", "jaxopt_lab", "flax")
# The client in a process that cannot import jaxopt_lab, jax or flax (an import hook: the
# editable install's path file would defeat `python -I`).
SERVE = f"""
import importlib.abc, runpy, sys
class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {BLOCKED!r}:
            raise ImportError(name + " is blocked: this process serves without it")
sys.meta_path.insert(0, Blocked())
for name in {BLOCKED!r}:
    try:
        __import__(name)
    except ImportError:
        pass
    else:
        raise SystemExit(name + " was imported")
sys.argv = [{str(CLIENT)!r}, *sys.argv[1:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""
INTEGER_OPS = {"ConvInteger", "MatMulInteger", "QLinearConv", "QLinearMatMul",
               "MatMulIntegerToFloat", "DynamicQuantizeMatMul"}
# Small widths, the registry's structure: every model's layers and ops, quickly.
SMALL = {"logreg": {}, "mlp": {"hidden": (32, 32)}, "cnn1d": {"channels": 8},
         "cnn2d": {"features": (8, 16)}, "resnet": {"depth": 8, "width": 8},
         "resnet18": {"width": 8}, "vit": {"dim": 32, "depth": 1, "heads": 2, "mlp_dim": 64},
         "transformer_lm": {"dim": 32, "depth": 1, "heads": 2, "mlp_dim": 64, "max_len": 16}}
INPUTS = {"logreg": (40,), "mlp": (40,), "cnn1d": (40,), "cnn2d": (8, 8, 1),
          "resnet": (16, 16, 3), "resnet18": (16, 16, 3), "vit": (8, 8, 3),
          "transformer_lm": (16,)}


def serve(tmp_path, model: str, inputs: dict, runtime: str, optimized: str | None = None):
    """The ONNX model's outputs for each array of `inputs`, from the blocked client."""
    np.savez(tmp_path / "inputs.npz", **inputs)
    args = [model, "--inputs", str(tmp_path / "inputs.npz"), "--outputs",
            str(tmp_path / "outputs.npz"), "--runtime", runtime]
    done = subprocess.run([sys.executable, "-c", SERVE, *args, *(
        ["--optimized", optimized] if optimized else [])], cwd=tmp_path, capture_output=True,
        text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(np.load(tmp_path / "outputs.npz"))


def _example(name: str, batch: int) -> np.ndarray:
    shape = INPUTS[name]
    if name == "transformer_lm":
        return np.random.RandomState(batch).randint(0, 10, (batch, *shape)).astype(np.int32)
    return np.random.RandomState(batch).normal(size=(batch, *shape)).astype(np.float32)


@pytest.mark.slow
def test_every_registry_model_exports_and_matches_in_both_runtimes(tmp_path):
    assert set(SMALL) == set(MODELS) == set(INPUTS)
    wanted = {}
    for name, hparams in SMALL.items():
        model = build_model(name, 10, **hparams)
        variables = model.init(jax.random.key(0), _example(name, 1))
        apply = stateless_inference(model)
        write_onnx(apply, variables, _example(name, 1), str(tmp_path / f"{name}.onnx"), {})
        # Traced with a symbolic batch; neither batch size was seen.
        wanted[name] = {f"b{b}": np.asarray(jax.jit(apply)(variables, _example(name, b)))
                        for b in (3, 7)}
    for runtime in RUNTIMES:
        for name, want in wanted.items():
            got = serve(tmp_path, str(tmp_path / f"{name}.onnx"),
                        {k: _example(name, int(k[1:])) for k in want}, runtime)
            for key, y in want.items():
                assert got[key].shape == y.shape, (runtime, name)
                np.testing.assert_allclose(got[key], y, rtol=1e-4, atol=1e-5 * np.abs(y).max(),
                                           err_msg=f"{name} in {runtime}, {key}")


def _qat_run(tmp_path, steps: int, channels: int) -> str:
    """A trained int8 QAT run of the MNIST-1D CNN (w8a8, per-example activation scales)."""
    config = tiny_config("cnn1d", steps=steps, measure=False)
    config.model = model_config("cnn1d", channels=channels)
    config.techniques.quantize.method = "qat"
    workdir = str(tmp_path / "qat")
    train_and_evaluate(config, workdir)
    return workdir


def _accuracy(outputs: np.ndarray, labels: np.ndarray) -> float:
    return float((outputs.argmax(-1) == labels).mean())


@pytest.mark.slow
def test_a_qat_runs_static_int8_form_serves_with_its_own_scales(tmp_path):
    workdir = _qat_run(tmp_path, steps=100, channels=16)
    quantized = quantize_run(workdir, calibrate_batches=4, scheme="w8a8")
    # Static scales calibrated from a QAT run; the dynamic evaluation is kept beside them.
    assert quantized["options"]["static_activations"] and quantized["calibration_batches"] == 4
    assert {"dynamic_test_accuracy", "dynamic_validation_accuracy"} <= set(quantized)
    assert quantized["serving_bit_identical"]

    run = load_run(workdir)
    model = serving_model(run, quantized)
    serving = load_serving(f"{workdir}/quantized/serving")
    x, labels = run.dataset.test["x"], run.dataset.test["label"]
    want = np.asarray(jax.jit(serve_fn(model))(serving, x))
    layers = quantized_layers(model, serving)
    assert len(layers) == 2  # Conv_1 and Conv_2; the first and last stay float (skip)
    for ops in ("qdq", "onnxruntime"):
        path = str(tmp_path / f"int8_{ops}.onnx")
        metadata = export_run(workdir, path, to="onnx", int8_ops=ops, check=())
        assert metadata["form"] == "w8a8 serving form" and metadata["int8_ops"] == ops
        graph = onnx.load(path).graph
        props = {p.key: p.value for p in onnx.load(path).metadata_props}
        assert json.loads(props["quantization"])["scheme"] == "w8a8"
        assert json.loads(props["input"])["preprocessing"] == run.dataset.preprocessing
        assert props["task"] == "classification" and "quantize" in json.loads(props["techniques"])
        _assert_the_runs_own_parameters(graph, layers)
        assert "Expand" not in {n.op_type for n in graph.node}  # x[..., None]: one Reshape
        for runtime in RUNTIMES if ops == "qdq" else ("onnxruntime",):  # its own operators
            optimized = str(tmp_path / f"{ops}.opt.onnx") if runtime == "onnxruntime" else None
            got = serve(tmp_path, path, {"test": x}, runtime, optimized)["test"]
            agreement = float((got.argmax(-1) == want.argmax(-1)).mean())
            assert agreement >= 0.995, (ops, runtime, agreement)
            assert abs(_accuracy(got, labels) - _accuracy(want, labels)) <= 0.002, (ops, runtime)
        # Int8 arithmetic in both forms (ONNX Runtime fuses the QDQ pairs), no float conv left.
        ran = [node.op_type for node in onnx.load(str(tmp_path / f"{ops}.opt.onnx")).graph.node]
        assert sum(op in INTEGER_OPS for op in ran) == len(layers) and "Conv" not in ran, ran


def _assert_the_runs_own_parameters(graph, layers) -> None:
    """The graph's int8 weights are the run's frozen values (in the runtime's layout) and its
    QuantizeLinear scales the run's static input scales."""
    tensors = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    int8 = [np.sort(v.ravel()) for v in tensors.values() if v.dtype == np.int8 and v.size > 1]
    for name, layer in layers.items():
        assert any(np.array_equal(v, np.sort(layer.value.ravel())) for v in int8), name
    quantize = [n for n in graph.node if n.op_type == "QuantizeLinear"]
    scales = sorted(float(tensors[n.input[1]]) for n in quantize)
    assert scales == sorted(float(layer.input_scale) for layer in layers.values())
    # int8's levels as uint8 codes with zero point 128, the type ONNX Runtime's int8 kernels take
    assert all(tensors[n.input[2]].dtype == np.uint8 and tensors[n.input[2]] == 128
               for n in quantize)


@pytest.mark.slow
def test_ptq_of_a_float_mlp_exports_from_the_cli(tmp_path):
    workdir = str(tmp_path / "mlp")
    train_and_evaluate(tiny_config("mlp", steps=60, measure=False), workdir)
    # One scale per weight tensor (the other tests' runs have one per output channel).
    quantize_run(workdir, calibrate_batches=2, scheme="w8a8", options={"per_channel": False})
    out = str(tmp_path / "mlp.onnx")
    result = run_cli("export", "--workdir", workdir, "--out", out, "--to", "onnx",
                     "--check", "onnxruntime", "openvino")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("argmax agreement") == 2
    with open(out + ".json") as f:
        checks = json.load(f)["checks"]
    assert [c["runtime"].split()[0] for c in checks] == list(RUNTIMES)
    assert all(c["argmax_agreement"] >= 0.99 and c["examples"] == 256 for c in checks)
    # ONNX Runtime fuses a 2-D MatMul and its bias into a float Gemm before it fuses QDQ pairs:
    # its own kernels run the dense layers in int8.
    own = str(tmp_path / "mlp_ort.onnx")
    result = run_cli("export", "--workdir", workdir, "--out", own, "--to", "onnx",
                     "--int8-ops", "onnxruntime")
    assert result.returncode == 0 and "argmax agreement 100" in result.stdout, result.stdout
    serve(tmp_path, own, {"x": np.zeros((2, 40), np.float32)}, "onnxruntime",
          str(tmp_path / "mlp.opt.onnx"))
    ran = [node.op_type for node in onnx.load(str(tmp_path / "mlp.opt.onnx")).graph.node]
    assert ran.count("MatMulIntegerToFloat") == 1, ran  # the hidden layer; first and last float


class OwnNet(nn.Module):
    """A researcher's module of standard Flax layers, with the quantization seams."""

    num_classes: int
    dot_general_cls: Any = None
    conv_general_dilated_cls: Any = None

    @nn.compact
    def __call__(self, x, train=False):
        x = x.reshape(x.shape[0], -1, 1)
        for features in (8, 8):
            x = nn.relu(nn.Conv(features, (3,),
                                conv_general_dilated_cls=self.conv_general_dilated_cls)(x))
        x = nn.max_pool(x, (2,), strides=(2,))  # positional, as Flax's docs write it
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(16, dot_general_cls=self.dot_general_cls)(x))
        return nn.Dense(self.num_classes, dot_general_cls=self.dot_general_cls)(x)


@pytest.mark.slow
def test_a_users_own_module_exports_float_and_int8(tmp_path, capsys):
    workdir = str(tmp_path / "own")
    model = OwnNet(num_classes=10)
    train_and_evaluate(tiny_config(steps=40, measure=False), workdir, model=model)
    float_check = export_run(workdir, str(tmp_path / "own.onnx"), to="onnx", model=model,
                             check=RUNTIMES)["checks"]
    quantize_run(workdir, calibrate_batches=2, scheme="w8a8", model=model)
    metadata = export_run(workdir, str(tmp_path / "own_int8.onnx"), to="onnx", model=model,
                          check=RUNTIMES)
    assert metadata["form"] == "w8a8 serving form"
    for check in [*float_check, *metadata["checks"]]:
        assert check["argmax_agreement"] >= 0.99, check
    assert all(c["max_abs_difference"] <= 1e-4 * c["max_abs_output"] for c in float_check)
    ops = {node.op_type for node in onnx.load(str(tmp_path / "own_int8.onnx")).graph.node}
    assert "QuantizeLinear" in ops and "Conv" not in ops  # convs as products of patches
    nodes = onnx.load(str(tmp_path / "own_int8.onnx")).graph.node
    dequantized = {n.output[0] for n in nodes if n.op_type == "DequantizeLinear"}
    int8_products = [n for n in nodes if n.op_type == "MatMul" and set(n.input) <= dequantized]
    assert len(int8_products) == 2  # Conv_1, Dense_0: the first and last layers stay float

    # Weights-only int8 exports too, saying that ONNX runtimes run it in float.
    quantize_run(workdir, scheme="w8", model=model)
    metadata = export_run(workdir, str(tmp_path / "own_w8.onnx"), to="onnx", model=model,
                          check=("onnxruntime",))
    assert "no faster than float32" in capsys.readouterr().err
    assert metadata["checks"][0]["argmax_agreement"] >= 0.99


odd_p = Primitive("researchers_own_kernel")
odd_p.def_impl(lambda x: x * 2)
odd_p.def_abstract_eval(lambda x: jax.core.ShapedArray(x.shape, x.dtype))
mlir.register_lowering(odd_p, mlir.lower_fun(lambda x: x * 2, multiple_results=False))


class OddBlock(nn.Module):
    @nn.compact
    def __call__(self, x):
        return x + odd_p.bind(jax.lax.stop_gradient(x))


class OddNet(nn.Module):
    num_classes: int
    batch_as_int: bool = False

    @nn.compact
    def __call__(self, x, train=False):
        if self.batch_as_int:
            x = x.reshape(len(x), -1)
            return nn.Dense(self.num_classes)(x)
        return nn.Dense(self.num_classes)(OddBlock(name="odd")(nn.Dense(8)(x)))


def _cli_without(module: str, *args: str) -> subprocess.CompletedProcess:
    """The CLI in a process where importing `module` fails."""
    code = (f"import sys; sys.modules[{module!r}] = None; from jaxopt_lab.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, check=False)


def _one_line(result, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def test_bad_onnx_exports_get_one_line(tmp_path):
    odd = str(tmp_path / "odd")
    train_and_evaluate(tiny_config(steps=2, measure=False), odd, model=OddNet(num_classes=10))
    with pytest.raises(UserError, match="primitive 'researchers_own_kernel' in layer .*odd"):
        export_run(odd, str(tmp_path / "odd.onnx"), to="onnx", model=OddNet(num_classes=10))
    # From the command line, the module found by the import path the run recorded.
    _one_line(run_cli("export", "--workdir", odd, "--out", str(tmp_path / "odd.onnx"), "--to",
                      "onnx", env={"PYTHONPATH": str(ROOT / "tests")}),
              "primitive 'researchers_own_kernel' in layer", "odd")
    assert not (tmp_path / "odd.onnx").exists()
    sized = str(tmp_path / "sized")
    train_and_evaluate(tiny_config(steps=2, measure=False), sized,
                       model=OddNet(num_classes=10, batch_as_int=True))
    with pytest.raises(UserError, match="uses it as a Python integer .* instead of len"):
        export_run(sized, str(tmp_path / "sized.onnx"), to="onnx",
                   model=OddNet(num_classes=10, batch_as_int=True))

    workdir = _qat_run(tmp_path, steps=2, channels=8)
    out = ["--workdir", workdir, "--out", str(tmp_path / "m.onnx"), "--to", "onnx"]
    _one_line(_cli_without("jax2onnx", "export", *out), "[deploy]", "jax2onnx")
    _one_line(_cli_without("openvino", "export", *out, "--check", "openvino"),
              "openvino is not installed", "[deploy]")
    _one_line(run_cli("export", *out, "--platforms", "cpu"), "--platforms is for --to stablehlo")
    _one_line(run_cli("export", *out, "--int8-ops", "onnxruntime", "--check", "openvino"),
              "ONNX Runtime's own operators, which openvino cannot load")
    quantize_run(workdir, scheme="w8a8")  # per-example activation scales: no static form
    _one_line(run_cli("export", *out), "quantizes its input per batch",
              "--scheme w8a8 --calibrate N")
    _one_line(run_cli("quantize", "--workdir", workdir, "--scheme", "w8", "--calibrate", "2"),
              "weights-only quantization has no activation scales")
    assert not (tmp_path / "m.onnx").exists()


def test_the_float_form_of_a_qat_run_keeps_its_quantizer(tmp_path):
    """jax2onnx's whole-layer rewrites would read the kernel and skip the seam: off."""
    workdir = _qat_run(tmp_path, steps=2, channels=8)
    metadata = export_run(workdir, str(tmp_path / "qat.onnx"), to="onnx", form="model")
    assert metadata["checks"][0]["argmax_agreement"] >= 0.99
    ops = {node.op_type for node in onnx.load(str(tmp_path / "qat.onnx")).graph.node}
    assert "Round" in ops  # the fake quantization is in the graph
    float_model = build_model("cnn1d", 10, channels=8)
    variables = float_model.init(jax.random.key(0), jnp.zeros((1, 40)))
    write_onnx(stateless_inference(float_model), variables, np.zeros((1, 40), np.float32),
               str(tmp_path / "float.onnx"), {})
    assert "Round" not in {n.op_type for n in onnx.load(str(tmp_path / "float.onnx")).graph.node}


def test_a_population_member_exports_as_its_own_model(tmp_path):
    config = tiny_config("mlp", steps=3, measure=False)
    config.population = (("optim.lr", (1e-3, 3e-1)),)
    workdir = str(tmp_path / "population")
    train_and_evaluate(config, workdir)
    out = str(tmp_path / "member1.onnx")
    metadata = export_run(workdir, out, to="onnx", member=1, check=RUNTIMES)
    assert metadata["member"] == 1 and len(metadata["checks"]) == 2
    assert all(c["max_abs_difference"] <= 1e-4 * c["max_abs_output"] for c in metadata["checks"])
    run = load_run(workdir)
    x = run.dataset.test["x"][:16]
    got = load_onnx(out, "onnxruntime")(x)
    members = [np.asarray(stateless_inference(run.experiment.model)(
        {"params": jax.tree.map(lambda a, i=i: a[i], run.state.params)}, x)) for i in (0, 1)]
    np.testing.assert_allclose(got, members[1], rtol=1e-4, atol=1e-5 * np.abs(members[1]).max())
    assert not np.allclose(got, members[0], atol=1e-3)  # the member, not the first one


@pytest.mark.slow
def test_serve_bench_checks_and_times_every_form(tmp_path):
    workdir = _qat_run(tmp_path, steps=20, channels=8)
    quantize_run(workdir, calibrate_batches=2, scheme="w8a8")
    result = serve_bench(workdir, batch_sizes=(1, 8), rounds=2, calls=2, progress=False)
    forms = result["forms"]
    assert set(forms) == {"xla float32", "xla serving", *(
        f"{r} {f}" for r in RUNTIMES for f in ("float32", "int8 qdq")), "onnxruntime int8 onnxruntime"}
    for name, row in forms.items():
        assert row["argmax_agreement"] >= 0.99, name
        assert len(row["latency_ms_batch8_rounds"]) == 2 and row["latency_ms_batch1"] > 0
        low, high = row["speedup_batch8_range"]
        assert low <= row["speedup_batch8"] <= high
    assert forms["xla float32"]["speedup_batch1_range"] == [1.0, 1.0]
    # The int8 forms are checked against the AQT serving, the float ones against the model.
    assert forms["onnxruntime int8 onnxruntime"]["reference_test_accuracy"] == \
        forms["xla serving"]["test_accuracy"]
    with open(tmp_path / "qat" / "deploy" / "serve_bench.json") as f:
        assert json.load(f)["forms"].keys() == forms.keys()
    _one_line(run_cli("serve-bench", "--workdir", workdir, "--runtime", "tensorrt"),
              "invalid choice: 'tensorrt'")


CTRL_C_AFTER_OPENVINO = """
import gc, signal, sys, threading
import numpy as np, onnx
from onnx import TensorProto, helper
from jaxopt_lab.core.interrupt import StopSignals
from jaxopt_lab.export.runtimes import load_onnx
io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [None, 4]) for n in "xy"]
graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu", io[:1], io[1:])
onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), sys.argv[1])
predictors = [load_onnx(sys.argv[1], "openvino")]
predictors[0](np.ones((2, 4), np.float32))
# Freed on another thread, as a garbage collection may happen to do.
worker = threading.Thread(target=lambda: (predictors.clear(), gc.collect()))
worker.start(), worker.join()
with StopSignals(announce=False) as stop:
    signal.raise_signal(signal.SIGINT)
print(stop.received)
"""


def test_a_ctrl_c_after_openvino_served_reaches_the_handler(tmp_path):
    """OpenVINO leaves the compiling thread's signal stack pointing at memory it frees: a
    Ctrl-C crashed the process (a segmentation fault) instead of asking for a checkpoint."""
    result = subprocess.run([sys.executable, "-c", CTRL_C_AFTER_OPENVINO,
                             str(tmp_path / "relu.onnx")], check=False, capture_output=True,
                            text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == f"[{int(signal.SIGINT)}]"


@pytest.mark.slow
def test_a_vits_int8_form_computes_what_its_graph_says_in_both_runtimes(tmp_path):
    """OpenVINO would quantize the float input of a product with int8 weights on its own
    (dynamic quantization, on by default): every ViT output moved by ~3 % of the logits' range
    and one argmax in 13 changed. Off, each runtime computes the graph: most examples equal the
    framework's to float rounding, the rest differ by where a value rounds to the next level."""
    config = tiny_config("vit", steps=20, measure=False)
    config.data.name = "digits"
    config.model = model_config("vit", dim=32, depth=1, heads=2, mlp_dim=64)
    config.techniques.quantize.method = "qat"
    config.techniques.quantize.attention = False
    workdir = str(tmp_path / "vit")
    train_and_evaluate(config, workdir)
    quantized = quantize_run(workdir, calibrate_batches=2, scheme="w8a8")
    run = load_run(workdir)
    serving = load_serving(f"{workdir}/quantized/serving")
    x = run.dataset.test["x"]
    want = np.asarray(jax.jit(serve_fn(serving_model(run, quantized)))(serving, x))
    path = str(tmp_path / "vit.onnx")
    export_run(workdir, path, to="onnx", check=())
    for runtime in RUNTIMES:
        got = serve(tmp_path, path, {"test": x}, runtime)["test"]
        per_example = np.abs(got - want).max(-1)
        assert np.median(per_example) <= 1e-4 * np.abs(want).max(), (runtime, per_example)
