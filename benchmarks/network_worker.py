"""One training process of `network_compress.py`, run inside a worker namespace of a throttled cluster.

It joins the others through `jax.distributed` (gloo over the namespaces' links: the
JAXOPT_LAB_COORDINATOR / _NUM_PROCESSES / _PROCESS_ID variables `jaxopt-lab launch` also sets) and,
for each seed and each method in turn, builds the framework's run from one config (`build_run`,
`prepare_training`: the step `jaxopt-lab train` compiles), then measures:

- compute: the same step on a mesh of this process's device alone, every process at once (their
  cores are shared as in training). One device all-reduces nothing and gathers from itself, so this
  is the forward/backward plus the compressor's own work, with no byte on the network;
- the distributed step: every step's wall time, each step waited for, until the validation
  accuracy (evaluated every `eval_every` steps, off the clock) reaches the target or `max_steps`.
  Communication = step time - compute.

Process 0 appends one JSON line per (seed, method) to OUT. Every process computes the same
validation accuracy (replicated parameters), so all stop at the same step.

    network_worker.py SPEC_JSON OUT
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from jaxopt_lab.compose import default_config, validate
from jaxopt_lab.core.config import model_config
from jaxopt_lab.core.distributed import initialize_distributed
from jaxopt_lab.core.feed import compile_k_steps, device_sampler, make_train_fn, replicate
from jaxopt_lab.core.state import init_sharded_state, sample_input
from jaxopt_lab.core.step import make_train_step
from jaxopt_lab.run.build import build_run
from jaxopt_lab.run.training import prepare_training
from jaxopt_lab.techniques.compress import compress_options
from jaxopt_lab.techniques.compress.powersgd import matrix_shape

COMPUTE_WARMUP, COMPUTE_STEPS = 3, 15  # after PowerSGD's start_step: its compressed step


def config_for(spec: dict, method: dict, seed: int):
    """The run's config, validated as `build_run` expects: spec["hidden"] widths on
    spec["data"], Adam, and `method`'s techniques.compress fields."""
    c = default_config()
    c.seed = seed
    c.data.name = spec["data"]
    c.data.batch_size = spec["batch_size"]
    c.data.validation_fraction = spec["validation_fraction"]
    c.model = model_config("mlp", hidden=tuple(spec["hidden"]))
    c.optim.name, c.optim.lr = "adam", spec["lr"]
    c.train.steps = spec["max_steps"]
    c.train.measure = c.train.progress = False
    for key, value in method["compress"].items():
        c.techniques.compress[key] = value
    validate(c)
    return c


def plain_bytes(params, method: dict) -> int:
    """Bytes of the tensors `method` all-reduces as they are (cost.collectives' plain_bytes)."""
    opts = compress_options(**method["compress"])  # the compressor's own defaults filled in
    total = 0
    for p in jax.tree.leaves(params):
        if opts.method == "powersgd":
            plain = matrix_shape(p.shape, opts.rank, opts.min_size) is None
        else:
            plain = p.size < max(opts.min_size, 1)
        total += p.size * p.dtype.itemsize if plain else 0
    return total


def compute_seconds(run, spec: dict) -> float:
    """Median step time on this process's device alone (module docstring)."""
    local = Mesh(np.asarray(jax.local_devices()), run.mesh.axis_names)
    e, config = run.experiment, run.config
    step = make_train_step(e.loss_fn, e.reducer, e.tx, local, e.state_metrics)
    per_worker = config.data.batch_size // jax.process_count()
    sample = device_sampler(len(run.dataset.train["label"]), per_worker, local)
    state = init_sharded_state(e, sample_input(run.dataset), local, config.seed)
    data = replicate(run.dataset.train, local)
    train_fn = make_train_fn(step, 1, sample)
    start = spec["powersgd_start_step"]
    for _ in range(start + COMPUTE_WARMUP):
        state, _ = train_fn(state, data)
    jax.block_until_ready(state)
    multihost_utils.sync_global_devices("compute")  # every process computes at once
    times = []
    for _ in range(COMPUTE_STEPS):
        t0 = time.perf_counter()
        state, _ = train_fn(state, data)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - t0)
    multihost_utils.sync_global_devices("compute done")
    return statistics.median(times)


def train_to_target(run, spec: dict) -> dict:
    """Steps until the validation accuracy reaches spec["target"] (module docstring)."""
    t = prepare_training(run, spec["workdir"], spec["max_steps"])  # nothing is saved there
    train_fn = compile_k_steps(t.step_fn, 1, streamed=False)  # the on-device data, one step a call
    carry = run.carry
    compiled = train_fn.lower(carry, t.source).compile()
    evaluate, target = t.evaluators["validation"], spec["target"]
    step_s, curve, reached, comm_bytes = [], [], None, []
    multihost_utils.sync_global_devices("train")
    for step in range(1, spec["max_steps"] + 1):
        t0 = time.perf_counter()
        carry, metrics = compiled(carry, t.source)
        jax.block_until_ready(carry)
        step_s.append(time.perf_counter() - t0)
        comm_bytes.append(metrics["comm_bytes"])  # fetched once, after the last step
        if step % spec["eval_every"] == 0:
            accuracy = evaluate(carry)["validation_accuracy"]
            curve.append((step, accuracy))
            if accuracy >= target:
                reached = step
                break
    if spec.get("params_out") and jax.process_index() == 0:  # a directory
        leaves = jax.tree.leaves(jax.device_get(carry.params))
        np.savez(f"{spec['params_out']}/{spec['label']}_s{spec['seed']}_{spec['rate_mbit']}.npz",
                 *leaves)
    return {"steps_to_target": reached,
            "time_to_target_s": math.fsum(step_s) if reached else None,
            "step_s": step_s, "validation_curve": curve,
            "comm_bytes": [float(b[0]) for b in jax.device_get(comm_bytes)]}


def main(spec_path: str, out: str) -> None:
    initialize_distributed()
    with open(spec_path) as f:
        spec = json.load(f)
    chief = jax.process_index() == 0
    for seed in spec["seeds"]:
        for method in spec["methods"]:
            run = build_run(config_for(spec, method, seed))
            params = run.carry.params
            record = {"method": method["label"], "seed": seed, "workers": jax.process_count(),
                      "rate_mbit": spec["rate_mbit"], "plain_bytes": plain_bytes(params, method),
                      "params": int(sum(p.size for p in jax.tree.leaves(params))),
                      "compute_s": compute_seconds(run, spec),
                      **train_to_target(run, {**spec, "label": method["label"], "seed": seed})}
            if chief:
                with open(out, "a") as f:
                    f.write(json.dumps(record) + "\n")
                reached = record["steps_to_target"]
                print(f"  {method['label']:>14} seed {seed}: "
                      + (f"{reached} steps, {record['time_to_target_s']:.1f} s" if reached
                         else f"not reached in {spec['max_steps']} steps"), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
