"""`jaxopt-lab profile --config X [--workdir D]`: where a model's time, memory and size go, before
anything is optimized ("profile first").

From the config, without training it: parameters and FLOPs per layer (counted from the jaxpr,
`core/measure.py`), the compiled training step's memory (arguments, outputs, temporaries), the
step time split into waiting for data and computing for both feeds (on-device sampling and the
streamed grain pipeline; a short run that synchronizes after every step, so the split is exact
and the normal loop is never slowed), model-FLOPs utilisation against this device's measured
matmul peak (`profile/peak.py`), inference latency at batch 1 and 256, and a `jax.profiler`
trace of a few steps in D/profile/trace that TensorBoard's profile plugin (xprof) opens. Writes
D/profile/profile.json and profile.md.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from collections import defaultdict

import jax
import ml_collections
import numpy as np

from jaxopt_lab.core.feed import compile_k_steps
from jaxopt_lab.core.measure import compiled_memory, count_flops, flops_by_scope, measure_model
from jaxopt_lab.core.state import model_params, sample_input
from jaxopt_lab.core.tasks import inference
from jaxopt_lab.errors import UserError
from jaxopt_lab.profile.peak import matmul_peak
from jaxopt_lab.run.build import build_run
from jaxopt_lab.run.training import prepare_training

TRACE_STEPS = 5


def profile_config(config: ml_collections.ConfigDict, workdir: str, steps: int = 30,
                   progress: bool = True) -> dict:
    """Profiles the model and step `config` trains; writes and returns D/profile/profile.json."""
    if config.population:
        raise UserError("profile one run: the config has a population (set --config.population=())")
    if steps < 3:
        raise UserError(f"--steps {steps}: give at least 3 (the first is compilation)")
    out = os.path.join(workdir, "profile")
    os.makedirs(out, exist_ok=True)
    feeds = {}
    with tempfile.TemporaryDirectory() as scratch:
        for on_device in (True, False):
            feed = "on_device" if on_device else "streamed"
            if progress:
                print(f"profile: timing {steps} steps, {feed} feed", flush=True)
            feed_config = config.copy_and_resolve_references()
            with feed_config.unlocked():
                feed_config.data.on_device = on_device
            run = prepare_training(build_run(feed_config), os.path.join(scratch, feed))
            if on_device:  # before the timed steps, which donate the state
                layers, memory, flops_per_step, measured = _static(run)
            feeds[feed] = _time_feed(run, steps, os.path.join(out, "trace") if on_device
                                     else None)
    peak = matmul_peak(config.train.compute_dtype)
    step_s = feeds["on_device"]["compute_s"]
    result = {
        "config": {"model": config.model.to_dict(), "data": config.data.name,
                   "batch_size": config.data.batch_size},
        "backend": jax.default_backend(),
        "devices": jax.device_count(),
        "layers": layers,
        "num_params": sum(layer["params"] for layer in layers),
        "step_memory": memory,
        "feeds": feeds,
        "flops_per_step": flops_per_step,
        "achieved_tflops": flops_per_step / step_s / 1e12,
        "peak_tflops": peak["tflops"],
        "peak_probe": peak,
        "mfu": flops_per_step / step_s / 1e12 / peak["tflops"] / jax.device_count(),
        **measured,
        "trace": os.path.join(out, "trace"),
    }
    result = json.loads(json.dumps(result))  # as written: tuples become lists
    with open(os.path.join(out, "profile.json"), "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(out, "profile.md"), "w") as f:
        f.write(markdown(result))
    return result


def _time_feed(run, steps: int, trace_dir: str | None) -> dict:
    """Median seconds per step waiting for the batch and computing, synchronized every step."""
    streamed = run.streamed is not None
    step = compile_k_steps(run.step_fn, 1, streamed)
    carry = run.run.carry
    waits, computes = [], []
    for i in range(steps):
        start = time.perf_counter()
        source = run.streamed.next(1) if streamed else run.source
        jax.block_until_ready(source)
        ready = time.perf_counter()
        carry, _ = step(carry, source)
        jax.block_until_ready(carry)
        if i:  # the first call compiles
            waits.append(ready - start)
            computes.append(time.perf_counter() - ready)
    if trace_dir:
        with jax.profiler.trace(trace_dir):
            for _ in range(TRACE_STEPS):
                carry, _ = step(carry, run.source)
            jax.block_until_ready(carry)
    wait, compute = statistics.median(waits), statistics.median(computes)
    return {"data_wait_s": wait, "compute_s": compute, "step_s": wait + compute,
            "data_wait_fraction": wait / (wait + compute)}


def _static(run) -> tuple[list[dict], dict, int, dict]:
    """Per-layer parameters and FLOPs, the step's compiled memory, its FLOPs and the model's
    inference measurements."""
    model = run.run.experiment.model
    variables = {"params": model_params(run.run.state.params), **run.run.state.model_state}
    sample_x = sample_input(run.run.dataset)
    flops = flops_by_scope(inference(model), variables, sample_x)
    params: dict[str, int] = defaultdict(int)
    for path, leaf in jax.tree_util.tree_leaves_with_path(variables["params"]):
        keys = [str(getattr(k, "key", k)) for k in path]
        params["/".join(keys[:-1])] += int(np.size(leaf))
    layers = [{"layer": name or "(root)", "params": params.get(name, 0),
               "flops_per_example": flops.get(name, 0)}
              for name in sorted(set(params) | set(flops))]
    memory = compiled_memory(compile_k_steps(run.step_fn, 1, False), run.run.carry, run.source)
    step_flops = count_flops(run.step_fn, run.run.carry, run.source)
    measured = measure_model(model, jax.device_get(variables), sample_x)
    return layers, memory, step_flops, measured


def markdown(result: dict) -> str:
    """The profile as Markdown: per-layer table, memory, feeds, utilisation, latency."""
    config = result["config"]
    lines = [(f"# Profile: {config['model']['name']} on {config['data']} (batch "
              f"{config['batch_size']}, {result['backend']}, {result['devices']} device(s))"), "",
             "| layer | params | FLOPs / example | share of FLOPs |", "|---|---|---|---|"]
    total = sum(layer["flops_per_example"] for layer in result["layers"]) or 1
    for layer in result["layers"]:
        lines.append(f"| {layer['layer']} | {layer['params']} | {layer['flops_per_example']} "
                     f"| {100 * layer['flops_per_example'] / total:.1f} % |")
    memory = result["step_memory"]
    lines += ["", f"Parameters: {result['num_params']}; model bytes: {result['model_bytes']}.",
              "", "Training step memory (compiled): " + (", ".join(
                  f"{k.removesuffix('_bytes')} {v / 2**20:.2f} MiB" for k, v in memory.items())
                  or "not reported by this backend") + ".", "",
              "| feed | waiting for data (ms) | computing (ms) | step (ms) | waiting share |",
              "|---|---|---|---|---|"]
    for feed, t in result["feeds"].items():
        lines.append(f"| {feed} | {1e3 * t['data_wait_s']:.3f} | {1e3 * t['compute_s']:.3f} "
                     f"| {1e3 * t['step_s']:.3f} | {100 * t['data_wait_fraction']:.1f} % |")
    lines += ["", (f"Model FLOPs utilisation: {100 * result['mfu']:.2f} % "
                   f"({result['achieved_tflops'] * 1e3:.2f} GFLOP/s of a measured "
                   f"{result['peak_tflops'] * 1e3:.1f} GFLOP/s {result['peak_probe']['dtype']} "
                   f"matmul peak; {result['flops_per_step']} FLOPs per step, forward and "
                   "backward)."),
              "", (f"Inference latency: {result['latency_ms_batch1']:.3f} ms at batch 1, "
                   f"{result['latency_ms_batch256']:.3f} ms at batch 256."), "",
              (f"Trace of {TRACE_STEPS} steps: {result['trace']} (tensorboard --logdir "
               f"{result['trace']}, Profile tab)."), ""]
    return "\n".join(lines)
