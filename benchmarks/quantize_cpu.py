"""Serving latency of the quantized forms against float32 on this CPU, as ratios in one run.

    .venv/bin/python benchmarks/quantize_cpu.py [--repeats 15] [--write]

For the MNIST-1D CNN (25 and 128 channels) and the digits CNN, every layer quantized (`skip=()`):
float32, the w8 serving form (int8 weights dequantized inside the compiled graph: float
arithmetic) and w8a8 (int8 × int8 → int32 matmuls), each compiled with its variables as arguments,
at batch 1 and 256. Repeats interleave the forms; a ratio is float time / form time within one
repeat (> 1 = faster), reported as median (lowest–highest). Weights are random: latency does not
depend on their values. `--write` puts the table in benchmarks/RESULTS.md and every repeat in
benchmarks/quantize_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import jax
import jax.numpy as jnp
from quantize_gpu import machine, time_variants, write_section

from jaxopt_lab.core.tasks import inference
from jaxopt_lab.models import build_model
from jaxopt_lab.techniques import quantize

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"mnist1d_cnn": ("cnn1d", {}, (40,)), "mnist1d_cnn128": ("cnn1d", {"channels": 128},
                                                                   (40,)),
          "digits_cnn": ("cnn2d", {}, (8, 8))}
BATCHES = (1, 256)


def forms(name: str) -> dict[str, tuple]:
    """{form: (compiled apply, its variables, the float model)} for one model."""
    kind, hparams, shape = MODELS[name]
    float_model = build_model(kind, 10, **hparams)
    x = jnp.zeros((1, *shape))
    variables = jax.jit(float_model.init)(jax.random.key(0), x)

    out = {"float32": (jax.jit(inference(float_model)), variables)}
    for scheme, activations in (("w8", False), ("w8a8", True)):
        model = quantize.wrap(float_model, skip=(), activations=activations)
        out[scheme] = (jax.jit(quantize.serve_fn(model)), quantize.convert(model, variables, x))
    return out


def measure(repeats: int) -> list[dict]:
    """One row per model, batch and form: medians and ranges, and under "per_repeat" every
    repeat's ms and ratio, so a later reader can tell noise from a difference."""
    rows = []
    for name, (_, _, shape) in MODELS.items():
        available = forms(name)
        for batch in BATCHES:
            x = jnp.zeros((batch, *shape))
            calls = {form: (lambda fn=fn, v=v, x=x: fn(v, x))
                     for form, (fn, v) in available.items()}
            seconds = time_variants(calls, repeats)
            for form, times in seconds.items():
                ratios = [f / t for f, t in zip(seconds["float32"], times, strict=True)]
                rows.append({"model": name, "batch": batch, "form": form,
                             "median_ms": 1e3 * statistics.median(times),
                             "ratio_median": statistics.median(ratios),
                             "ratio_min": min(ratios), "ratio_max": max(ratios),
                             "per_repeat": {"ms": [1e3 * t for t in times],
                                            "ratio": ratios}})
            print(f"{name} batch {batch}: " + ", ".join(
                f"{r['form']} {r['ratio_median']:.2f}x" for r in rows[-len(seconds):]), flush=True)
    return rows


def table(rows: list[dict], repeats: int) -> list[str]:
    info = machine()
    lines = [(f"## Quantized serving on this CPU ({info['device_kind']}, {info['host']}, jax "
              f"{info['jax']}, aqtp {info['aqtp']})"), "",
             (f"`benchmarks/quantize_cpu.py --repeats {repeats}`: every layer quantized "
              "(`skip=()`); speed-up = float32 time / form time within one repeat, median "
              "(lowest–highest); > 1 is faster."), "",
             "| model | batch | form | median ms | speed-up vs float32 |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['batch']} | {r['form']} | {r['median_ms']:.3f} | "
                     f"{r['ratio_median']:.2f}× ({r['ratio_min']:.2f}–{r['ratio_max']:.2f}) |")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "quantize_cpu.json"))
    args = parser.parse_args(argv)
    rows = measure(args.repeats)
    lines = table(rows, args.repeats)
    print("\n".join(lines))
    if args.write:
        write_section(Path(args.results), "quantize-cpu", lines)
        Path(args.json).write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2)
                                   + "\n")


if __name__ == "__main__":
    main()
