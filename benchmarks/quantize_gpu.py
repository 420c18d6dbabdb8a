"""Int8 serving and AQT training of one dense layer, timed against bf16 in the same run.

    python3 benchmarks/quantize_gpu.py --repeats 5 --write  # on a GPU (device_quantize.sh)
    .venv/bin/python benchmarks/quantize_gpu.py --tiny --repeats 2  # CPU smoke run, small shapes

Serving, y = x @ W with x (M, K) and W (K, N), in three forms: (a) bf16 x and bf16 W, the baseline;
(b) int8 weights: W stored as int8 with one float scale per output channel, dequantized inside the
compiled graph, `(x @ W_int8.astype(bf16)) * scale`: weight-only, so a memory-bound layer reads
half the bytes; (c) w8a8: x also quantized, per row and at run time, then an int8 x int8 -> int32
`lax.dot_general` scaled back to bf16. Shapes: one compute-bound (M = 8192 tokens) and several
memory-bound (batch 1 to 16 against a 0.5 GB weight, far larger than any cache).

Training: one step of one large dense layer, forward and backward to the weight and to the input
(as in a hidden layer), loss <y, t> for a fixed random cotangent t: bf16 baseline, AQT int8 forward
only (`config_v4(fwd_bits=8, dlhs_bits=None, drhs_bits=None)`) and AQT fully quantized
(`fully_quantized(fwd_bits=8, bwd_bits=8)`, stochastic rounding of the gradient from a key given
to every step through `config.set_context`).

Each variant is warmed up (compile included), then run back to back enough times that one repeat
lasts MIN_REPEAT_S; repeats interleave the variants, so drift hits them alike. A ratio is
bf16 time / variant time within one repeat (> 1 = faster); the table gives its median and range.
The relative error is against a float32 product at HIGHEST precision (serving: y; training: dW).

What was measured outside this project, on an H200 (a lead, not a result of this script): an int8
GEMM peaks at about 1.2x bf16 when compute-bound; AQT fully quantized training of a large dense
layer ran at 0.55x of bf16 and AQT forward-only at 0.93x. Weight-only int8 should approach 2x
when memory-bound; the goal for int8 serving there is >= 1.5x. The numbers in
benchmarks/RESULTS.md come only from this script (`--write`), never typed by hand.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from results_file import write_section

ROOT = Path(__file__).resolve().parents[1]
# (M, K, N, regime): M rows of x (the batch, or tokens), a K -> N layer.
SERVING_SHAPES = ((8192, 8192, 8192, "compute"), (1, 8192, 28672, "memory"),
                  (4, 8192, 28672, "memory"), (16, 8192, 28672, "memory"),
                  (16, 16384, 16384, "memory"))
TRAINING_SHAPES = ((8192, 8192, 8192), (8192, 8192, 28672))
TINY_SERVING = ((256, 256, 256, "compute"), (1, 512, 1024, "memory"), (16, 512, 1024, "memory"))
TINY_TRAINING = ((128, 256, 256),)
WARMUP_CALLS = 2
MIN_REPEAT_S = 0.05  # each repeat runs a variant back to back for at least this long
DIMS = (((1,), (0,)), ((), ()))  # x (M, K) . W (K, N)


def quantize_columns(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Symmetric int8 with one float32 scale per output channel (column): W ~ W_q * scale."""
    scale = jnp.max(jnp.abs(w.astype(jnp.float32)), axis=0) / 127.0
    w_q = jnp.clip(jnp.round(w.astype(jnp.float32) / scale), -127, 127).astype(jnp.int8)
    return w_q, scale


def serve_bf16(x, w, w_q, scale):
    del w_q, scale
    return x @ w


def serve_int8_weights(x, w, w_q, scale):
    del w
    return (x @ w_q.astype(x.dtype)) * scale.astype(x.dtype)


def serve_w8a8(x, w, w_q, scale):
    del w
    x_scale = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=1, keepdims=True) / 127.0
    x_q = jnp.clip(jnp.round(x / x_scale), -127, 127).astype(jnp.int8)
    acc = lax.dot_general(x_q, w_q, DIMS, preferred_element_type=jnp.int32)
    return (acc.astype(jnp.float32) * x_scale * scale).astype(x.dtype)


SERVING = (("bf16 x, bf16 W (baseline)", serve_bf16),
           ("int8 W, dequantized in graph", serve_int8_weights),
           ("w8a8: int8 x int8 -> int32", serve_w8a8))


def training_steps() -> tuple[tuple[str, Callable], ...]:
    """(name, step(x, w, t, key) -> (loss, (dx, dw))) for bf16 and the two AQT configs."""
    from aqt.jax.v2 import config as aqt_config  # here: only the training part needs AQT

    def step_for(cfg: aqt_config.DotGeneral | None) -> Callable:
        def step(x, w, t, key):
            dg = (lax.dot_general if cfg is None
                  else aqt_config.set_context(cfg, key, train_step=None))

            def loss(x, w):
                return jnp.sum(dg(x, w, DIMS).astype(jnp.float32) * t)

            return jax.value_and_grad(loss, argnums=(0, 1))(x, w)
        return step

    return (("bf16 (baseline)", step_for(None)),
            ("AQT int8 forward only", step_for(aqt_config.config_v4(
                fwd_bits=8, dlhs_bits=None, drhs_bits=None))),
            ("AQT fully quantized int8", step_for(aqt_config.fully_quantized(
                fwd_bits=8, bwd_bits=8))))


def time_variants(calls: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each variant, one value per repeat; the repeats interleave variants."""
    per_repeat = {}
    for name, call in calls.items():
        for _ in range(WARMUP_CALLS):
            jax.block_until_ready(call())
        start = time.perf_counter()
        jax.block_until_ready(call())
        per_repeat[name] = max(1, math.ceil(MIN_REPEAT_S / (time.perf_counter() - start)))
    seconds = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            n = per_repeat[name]
            start = time.perf_counter()
            for _ in range(n):
                out = call()  # dispatch is asynchronous: the calls queue on the device
            jax.block_until_ready(out)
            seconds[name].append((time.perf_counter() - start) / n)
    return seconds


def relative_error(y: jax.Array, ref: jax.Array) -> float:
    y = y.astype(jnp.float32)
    return float(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref))


def _attempt(fn: Callable[[], object]) -> str | None:
    """Runs fn (a first, compiling call); returns None, or the one-line error it raised."""
    try:
        jax.block_until_ready(fn())
        return None
    except Exception as error:  # noqa: BLE001 -- a failing variant (AQT on a newer jax) is a row
        return f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"


def _rows(part: str, shape: tuple[int, int, int], regime: str, names: list[str],
          seconds: dict[str, list[float]], errors: dict[str, str | None],
          rel: dict[str, float], flops: float, nbytes: dict[str, float]) -> list[dict]:
    base = seconds.get(names[0])
    rows = []
    for name in names:
        row = {"part": part, "shape": "{}×{}→{}".format(*shape), "regime": regime,
               "variant": name, "error": errors.get(name)}
        if name in seconds:
            times = seconds[name]
            ratios = [b / v for b, v in zip(base, times)]
            median = statistics.median(times)
            row.update(seconds=times, median_ms=1e3 * median, tflops=flops / median / 1e12,
                       gbps=nbytes[name] / median / 1e9, speedup=statistics.median(ratios),
                       speedup_range=[min(ratios), max(ratios)], rel_error=rel[name])
        rows.append(row)
    return rows


def serving_rows(shapes, repeats: int, key: jax.Array) -> list[dict]:
    rows = []
    for m, k, n, regime in shapes:
        kx, kw = jax.random.split(jax.random.fold_in(key, m * k + n))
        x = jax.random.normal(kx, (m, k), jnp.bfloat16)
        w = (jax.random.normal(kw, (k, n), jnp.float32) / math.sqrt(k)).astype(jnp.bfloat16)
        w_q, scale = jax.jit(quantize_columns)(w)
        ref = jnp.matmul(x.astype(jnp.float32), w.astype(jnp.float32),
                         precision=lax.Precision.HIGHEST)
        names = [name for name, _ in SERVING]
        fns = {name: jax.jit(fn) for name, fn in SERVING}
        args = (x, w, w_q, scale)
        calls = {name: (lambda f=f, args=args: f(*args)) for name, f in fns.items()}
        errors = {name: _attempt(call) for name, call in calls.items()}
        if errors[names[0]]:
            raise RuntimeError(f"bf16 baseline failed at {m}×{k}→{n}: {errors[names[0]]}")
        ok = {name: call for name, call in calls.items() if not errors[name]}
        seconds = time_variants(ok, repeats)
        rel = {name: relative_error(call(), ref) for name, call in ok.items()}
        io = 2 * m * k + 2 * m * n  # x and y in bf16
        nbytes = dict(zip(names, (io + 2 * k * n, io + k * n + 4 * n, io + k * n + 4 * n)))
        rows += _rows("serving", (m, k, n), regime, names, seconds, errors, rel, 2 * m * k * n,
                      nbytes)
        print(*_table(rows[-len(names):], serving=True)[2:], sep="\n", flush=True)
    return rows


def training_rows(shapes, repeats: int, key: jax.Array) -> list[dict]:
    try:
        steps = training_steps()
    except Exception as error:  # noqa: BLE001 -- AQT missing or broken: the rows say why
        message = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
        return [{"part": "training", "shape": "{}×{}→{}".format(*s), "regime": "compute",
                 "variant": "AQT", "error": message} for s in shapes]
    rows = []
    for m, k, n in shapes:
        kx, kw, kt, kr = jax.random.split(jax.random.fold_in(key, m * k + n), 4)
        x = jax.random.normal(kx, (m, k), jnp.bfloat16)
        w = (jax.random.normal(kw, (k, n), jnp.float32) / math.sqrt(k)).astype(jnp.bfloat16)
        t = jax.random.normal(kt, (m, n), jnp.bfloat16)
        ref = jnp.matmul(x.astype(jnp.float32).T, t.astype(jnp.float32),
                         precision=lax.Precision.HIGHEST)  # dW of <x W, t>
        names = [name for name, _ in steps]
        fns = {name: jax.jit(fn) for name, fn in steps}
        args = (x, w, t, kr)
        calls = {name: (lambda f=f, args=args: f(*args)) for name, f in fns.items()}
        errors = {name: _attempt(call) for name, call in calls.items()}
        if errors[names[0]]:
            raise RuntimeError(f"bf16 training step failed at {m}×{k}→{n}: {errors[names[0]]}")
        ok = {name: call for name, call in calls.items() if not errors[name]}
        seconds = time_variants(ok, repeats)
        rel = {name: relative_error(call()[1][1], ref) for name, call in ok.items()}
        nbytes = {name: 2 * (2 * m * k + 2 * k * n + 2 * m * n) for name in names}  # in + grads
        rows += _rows("training", (m, k, n), "compute", names, seconds, errors, rel,
                      3 * 2 * m * k * n, nbytes)
        print(*_table(rows[-len(names):], serving=False)[2:], sep="\n", flush=True)
    return rows


def _table(rows: list[dict], serving: bool) -> list[str]:
    err = "rel. error of y" if serving else "rel. error of dW"
    lines = [(f"| layer M×K→N | regime | variant | median ms | TFLOP/s | GB/s | "
              f"speed-up vs bf16, median (range) | {err} |"), "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['shape']} | {r['regime']} | {r['variant']} | failed: "
                         f"{r['error'].replace('|', '/')} | | | | |")
            continue
        low, high = r["speedup_range"]
        lines.append(f"| {r['shape']} | {r['regime']} | {r['variant']} | {r['median_ms']:.4g} | "
                     f"{r['tflops']:.3g} | {r['gbps']:.4g} | {r['speedup']:.2f}× "
                     f"({low:.2f}–{high:.2f}) | {r['rel_error']:.1e} |")
    return lines


def machine() -> dict:
    devices = jax.devices()

    def version(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "absent"

    return {"device_kind": devices[0].device_kind, "platform": devices[0].platform,
            "devices": len(devices), "jax": jax.__version__, "jaxlib": version("jaxlib"),
            "aqtp": version("aqtp"), "numpy": np.__version__, "python": platform.python_version(),
            "host": platform.machine()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="small shapes: a CPU smoke run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--write", action="store_true",
                        help="write the section into --results and the rows into --json")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "quantize_gpu.json"))
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    defaults = {ROOT / "benchmarks/RESULTS.md", ROOT / "benchmarks/quantize_gpu.json"}
    if args.tiny and args.write and {Path(args.results).resolve(), Path(args.json).resolve()} & defaults:
        parser.error("--tiny shapes measure nothing worth keeping: pass --results and --json")

    info = machine()
    key = jax.random.key(0)
    print(f"device: {info['device_kind']} ({info['platform']}), jax {info['jax']}, "
          f"aqtp {info['aqtp']}", flush=True)
    serving = serving_rows(TINY_SERVING if args.tiny else SERVING_SHAPES, args.repeats, key)
    training = training_rows(TINY_TRAINING if args.tiny else TRAINING_SHAPES, args.repeats, key)

    command = (f"`benchmarks/quantize_gpu.py{' --tiny' if args.tiny else ''} --repeats "
               f"{args.repeats}` on {info['device_kind']} ({info['platform']}, "
               f"{info['devices']} device(s)), jax {info['jax']}, jaxlib {info['jaxlib']}, "
               f"aqtp {info['aqtp']}, Python {info['python']}.")
    tiny = " (tiny smoke shapes)" if args.tiny else ""
    lines = [f"## Quantization on {info['device_kind']}{tiny}", "", command,
             ("Median seconds per call after warm-up over interleaved repeats; speed-up = bf16 "
              "time / variant time within a repeat (> 1 = faster), median (lowest–highest). "
              "GB/s counts x, W as stored and y once; the error is against a float32 product."),
             "", "Serving y = x @ W (bf16 out):", "", *_table(serving, serving=True), "",
             "One training step of the layer (loss <y, t>, gradients to x and W):", "",
             *_table(training, serving=False)]
    print("\n".join(lines))
    if args.write:
        tag = "quantize-" + re.sub(r"[^a-z0-9]+", "-", info["device_kind"].lower()).strip("-")
        write_section(Path(args.results), tag, lines)
        Path(args.json).write_text(json.dumps(
            {"machine": info, "argv": sys.argv[1:], "tiny": args.tiny, "repeats": args.repeats,
             "rows": serving + training}, indent=1) + "\n")
        print(f"wrote section {tag!r} of {args.results} and {args.json}")


if __name__ == "__main__":
    main()
