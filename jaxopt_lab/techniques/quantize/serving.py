"""Post-training calibration and the serving form: int8 (or int4, fp8) weights and their scales
frozen by AQT's CONVERT mode, run by its SERVE mode without the float kernels.

The serving variables are the model's variables with every quantized layer's float kernel taken
out and the "aqt" collection holding its quantized value and scale. At inference the kernels'
places are filled with zeros inside the compiled function; SERVE never reads them, so XLA drops
them and no float copy of a quantized weight exists at run time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import flax
import jax
import jax.numpy as jnp

from jaxopt_lab.core.tasks import EvalFn, apply_model, inference, make_task, train_kwargs
from jaxopt_lab.techniques.quantize.layers import QuantMode, inject
from jaxopt_lab.techniques.quantize.options import QUANT_COLLECTION, QuantizeOptions

_FROZEN_KEY = "qrhs"


def quantization_of(model) -> tuple[QuantizeOptions, tuple[str, ...]]:
    """The options and resolved skip patterns a `quantize.wrap`ped model carries."""
    seam = getattr(model, "dot_general_cls", None)
    args = getattr(seam, "args", ())
    if len(args) < 2 or not isinstance(args[0], QuantizeOptions):
        raise ValueError(f"{type(model).__name__} is not a quantize.wrap()ped model")
    return args[0], args[1]


def with_mode(model, mode: QuantMode):
    """The same quantized model in another AQT mode (CALIBRATE, CONVERT, SERVE, TRAIN)."""
    options, skip = quantization_of(model)
    return inject(model, options, skip, mode)


def calibrate(model, variables: dict, batches: Iterable[Any]) -> dict:
    """Static activation ranges for post-training quantization: `variables` with the "aqt"
    collection's running means of per-batch absolute maxima over `batches` (inputs), as AQT's
    MeanOfAbsMaxCalibration keeps them. `model` is wrapped with static_activations=True."""
    calibrating = with_mode(model, QuantMode.CALIBRATE)
    params = variables["params"]
    state = {k: v for k, v in variables.items() if k != "params"}

    @jax.jit
    def update(state, x):
        _, state, _ = apply_model(calibrating, params, state, x, None, train=True)
        return state

    seen = 0
    for x in batches:
        if QUANT_COLLECTION not in state:  # the statistics start as zeros, created by an init
            _, created = calibrating.apply({"params": params, **state}, x,
                                           mutable=[QUANT_COLLECTION],
                                           rngs={"params": jax.random.key(0)})
            state = {**state, **created}
        state = update(state, x)
        seen += 1
    if not seen:
        raise ValueError("calibration needs at least one batch")
    return {"params": params, **state}


def convert(model, variables: dict, sample_x) -> dict:
    """The serving variables of a quantized model: float kernels of quantized layers dropped,
    their quantized values and scales (AQT's frozen QTensors) in the "aqt" collection."""
    converting = with_mode(model, QuantMode.CONVERT)
    params = variables["params"]
    state = {k: v for k, v in variables.items() if k != "params"}
    # Compiled, as training's evaluation is: XLA computes a scale as the training graph does
    # (a division by a constant becomes a multiplication), so the frozen scales are bit-equal.
    @jax.jit
    def freeze(params, state, x):
        _, frozen = converting.apply({"params": params, **state}, x, mutable=[QUANT_COLLECTION],
                                     rngs={"params": jax.random.key(0)}, **train_kwargs(model, False))
        return frozen

    frozen = freeze(params, state, sample_x)
    merged = flax.core.unfreeze(frozen[QUANT_COLLECTION])
    dropped = {layer + ("kernel",) for layer in _frozen_layers(merged)}
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
    serving_params = flax.traverse_util.unflatten_dict(
        {path: value for path, value in flat.items() if path not in dropped})
    return {**state, "params": serving_params, QUANT_COLLECTION: merged}


def _frozen_layers(aqt_collection: dict) -> list[tuple[str, ...]]:
    """The paths of the layers whose kernel the collection holds frozen."""
    layers = []
    for path in flax.traverse_util.flatten_dict(aqt_collection):
        if _FROZEN_KEY in path:
            seam = next(i for i, part in enumerate(path) if part.startswith("Quantized"))
            layers.append(path[:seam])
    return list(dict.fromkeys(layers))


def with_placeholders(model, serving_params: dict, sample_x) -> dict:
    """`serving_params` completed with zero kernels where quantized layers had theirs, so the
    model's parameter structure is whole; call inside the compiled function (XLA drops them)."""
    training = with_mode(model, QuantMode.TRAIN)
    abstract = jax.eval_shape(
        lambda x: training.init({"params": jax.random.key(0)}, x, **train_kwargs(training, False)),
        sample_x)["params"]
    have = flax.traverse_util.flatten_dict(flax.core.unfreeze(serving_params))
    full = {path: have[path] if path in have else jnp.zeros(leaf.shape, leaf.dtype)
            for path, leaf in flax.traverse_util.flatten_dict(flax.core.unfreeze(abstract)).items()}
    return flax.traverse_util.unflatten_dict(full)


def serve_fn(model) -> Callable[[dict, jax.Array], jax.Array]:
    """`serve(serving_variables, x) -> outputs` for a quantized model: AQT's SERVE mode from the
    frozen values and scales. Jit it; the float kernels it lacks are placeholders XLA removes."""
    serving = with_mode(model, QuantMode.SERVE)

    def serve(serving_variables: dict, x: jax.Array) -> jax.Array:
        params = with_placeholders(model, serving_variables["params"], x[:1])
        return inference(serving)({**serving_variables, "params": params}, x)

    return serve


def served_eval_fn(model, task: str, sample_x) -> EvalFn:
    """The task's evaluation (per-example metrics) of the serving form: `eval_fn(serving_params,
    serving_state, batch)`, for core/evaluate.py."""
    serving = with_mode(model, QuantMode.SERVE)
    eval_fn = make_task(task, serving).eval_fn

    def served(serving_params, serving_state, batch):
        return eval_fn(with_placeholders(model, serving_params, sample_x), serving_state, batch)

    return served
