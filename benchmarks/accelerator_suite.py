"""One prepared accelerator benchmark: everything issue 13 asks a GPU (or TPU) to measure, in one
run of at most ~5 minutes, written as one JSON and one section of benchmarks/RESULTS.md.

    python3 benchmarks/accelerator_suite.py --write            # on the device (device_suite.sh)
    .venv/bin/python benchmarks/accelerator_suite.py --tiny    # CPU smoke run, tiny shapes

Parts, in this order (each wrapped: one failing records its error and the others still run; the
JSON and the section are rewritten after every part, so a run cut short keeps what it measured):
  peak        an n×n×n bf16 matmul (8192³): the measured peak that % of peak refers to;
  resnet      ResNet-18 (basic blocks [2, 2, 2, 2], widths 64–512, 32×32 inputs) on synthetic
              data: the framework's train step (config -> build_experiment -> make_train_step ->
              the loop's compiled call) against a hand-written Flax step (jit of value_and_grad +
              optax), in float32 and bfloat16 (`train.compute_dtype`), interleaved; TFLOP/s from
              FLOPs counted in the hand-written step's jaxpr (core/measure.py);
  overhead    benchmarks/overhead.py (framework loop vs hand-written loop, MLP and CNN, at K=1 and
              the chosen K), as a subprocess; its table is embedded in this section;
  population  1,024 MNIST-1D MLP trials as one vmapped program against one trial, K steps scanned;
  vit         a ViT-S (dim 384, depth 12, 6 heads, MLP 1536, 4×4 patches on 32×32) as `resnet`;
  quantize    benchmarks/quantize_gpu.py --repeats 3, as a subprocess (off by default: --quantize).
A part that would start after --budget-s is recorded as skipped.
"""

from __future__ import annotations

import argparse
import collections
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import jax
from results_file import write_section
from suite_steps import compare_steps, matmul_peak, one_line, population_throughput

ROOT = Path(__file__).resolve().parents[1]
# In order of what the issue's goals need most: a run cut short loses the last ones.
PARTS = ("peak", "resnet", "overhead", "population", "vit", "quantize")
VIT_S = {"patch_size": 4, "dim": 384, "depth": 12, "heads": 6, "mlp_dim": 1536}
# Per mode: matmul n; (model, hparams, input shape, batch) per step model; population trials and
# K; overhead.py's arguments; repeats and the least seconds per repeat.
SIZES = {
    "full": {"peak_n": 8192,
             "resnet": ("resnet18", {}, (32, 32, 3), 512), "vit": ("vit", VIT_S, (32, 32, 3), 256),
             "trials": 1024, "steps_per_call": 50,
             "overhead_args": ["--steps", "1000", "--repeats", "2"],
             "repeats": 5, "min_repeat_s": 0.3},
    "tiny": {"peak_n": 256,  # a CIFAR ResNet-8 for ResNet-18: its conv-BN path, compiled fast
             "resnet": ("resnet", {"depth": 8, "width": 4}, (8, 8, 3), 8),
             "vit": ("vit", {"patch_size": 4, "dim": 16, "depth": 1, "heads": 2, "mlp_dim": 32},
                     (8, 8, 3), 8),
             "trials": 4, "steps_per_call": 5,
             "overhead_args": ["--steps", "40", "--repeats", "1", "--models", "mlp"],
             "repeats": 2, "min_repeat_s": 0.02},
}


def machine() -> dict:
    device = jax.devices()[0]

    def version(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "absent"

    return {"device_kind": device.device_kind, "platform": device.platform,
            "devices": jax.device_count(), "jax": jax.__version__, "jaxlib": version("jaxlib"),
            "flax": version("flax"), "optax": version("optax"),
            "python": platform.python_version(), "host": platform.machine(),
            "cpus": os.cpu_count()}


def run_script(argv: list[str], timeout_s: float) -> dict:
    """Runs `python3 argv` from the repository root, echoing its output as it comes; returns the
    exit code, wall time and the last lines (killed after `timeout_s`).

    This process holds 75 % of a GPU's memory (XLA's default preallocation), so the child
    allocates as it goes from the rest. A TPU is held by one process at a time: there the
    subprocess parts fail, with their error recorded; run those scripts on their own.
    """
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH"))
                                          if p))
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env)
    timer = threading.Timer(max(1.0, timeout_s), proc.kill)
    timer.start()
    tail = collections.deque(maxlen=30)
    for line in proc.stdout:
        print("  | " + line, end="", flush=True)
        tail.append(line.rstrip())
    code = proc.wait()
    timed_out = not timer.is_alive() and code != 0
    timer.cancel()
    result = {"command": " ".join(argv), "returncode": code, "timed_out": timed_out,
              "wall_s": time.perf_counter() - start, "tail": list(tail)}
    if code != 0:
        last = next((t for t in reversed(tail) if t.strip()), "")
        result["error"] = (f"killed after {timeout_s:.0f} s (out of budget)" if timed_out
                           else f"exit {code}: {last[:200]}")
    return result


def section_body(path: Path) -> list[str]:
    """The lines a script wrote between its section markers in `path`, headings demoted."""
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines()
             if not line.startswith("<!-- ") and not line.startswith("# Benchmark results")]
    return ["##" + line if line.startswith("## ") else line for line in lines]


# --- the section ----------------------------------------------------------------------------------

def _num(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def _ratio(r: dict | None) -> str:
    return "—" if r is None else f"{r['median']:.2f}× ({r['low']:.2f}–{r['high']:.2f})"


def step_lines(rows: list[dict]) -> list[str]:
    lines = [("| model | batch | variant | median ms | examples/s | TFLOP/s | % of peak | "
             "compile s |"), "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if "variants" not in row:
            lines.append(f"| {row['model']} | {row.get('batch', '')} | failed: "
                         f"{row['error'].replace('|', '/')} | | | | | |")
            continue
        for name, v in row["variants"].items():
            if "median_ms" not in v:
                lines.append(f"| {row['model']} | {row['batch']} | {name} | failed: "
                             f"{v['error'].replace('|', '/')} | | | | |")
                continue
            lines.append(f"| {row['model']} | {row['batch']} | {name} | {v['median_ms']:.3f} | "
                         f"{v['examples_per_s']:.0f} | {_num(v.get('tflops'), '.3g')} | "
                         f"{_num(v.get('pct_of_peak'), '.1f')} | {v['compile_s']:.1f} |")
    names = next((list(r["ratios"]) for r in rows if "ratios" in r), [])
    if names:
        lines += ["", "| model | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        lines += [f"| {r['model']} | " + " | ".join(_ratio(r["ratios"][n]) for n in names) + " |"
                  for r in rows if "ratios" in r]
    return lines


def population_lines(part: dict) -> list[str]:
    rows = part["variants"]
    lines = ["| variant | median ms per call | trials·steps/s | compile s |", "|---|---|---|---|"]
    for name, v in rows.items():
        if "median_ms" not in v:
            lines.append(f"| {name} | failed: {v['error'].replace('|', '/')} | | |")
        else:
            lines.append(f"| {name} | {v['median_ms']:.3f} | {v['trial_steps_per_s']:.0f} | "
                         f"{v['compile_s']:.1f} |")
    ratio = part["ratios"]["population / one trial, trials·steps/s"]
    return [*lines, "", f"Population / one trial, trials·steps/s: {_ratio(ratio)}."]


def section(report: dict, tiny: bool) -> list[str]:
    info, parts = report["machine"], report["parts"]
    lines = [f"## Accelerator suite on {info['device_kind']}{' (tiny smoke shapes)' if tiny else ''}",
             "", (f"`benchmarks/accelerator_suite.py {' '.join(report['argv'])}` on "
                  f"{info['device_kind']} ({info['platform']}, {info['devices']} device(s)), "
                  f"jax {info['jax']}, jaxlib {info['jaxlib']}, flax {info['flax']}, Python "
                  f"{info['python']}; {report['elapsed_s']:.0f} s in all."),
             ("Medians over interleaved repeats; a ratio is taken within each repeat: median "
              "(lowest–highest), > 1 = the first named is faster. TFLOP/s: FLOPs counted in the "
              "hand-written step's jaxpr (matmuls and convolutions, 2 per MAC) over its time.")]
    for name in PARTS:
        part = parts.get(name)
        if part is None:
            continue
        title = {"peak": "Peak", "resnet": "ResNet train step: framework vs hand-written Flax",
                 "vit": "ViT train step: framework vs hand-written Flax",
                 "population": "A population as one program vs one trial",
                 "overhead": "Framework loop vs hand-written loop (benchmarks/overhead.py)",
                 "quantize": "Quantization (benchmarks/quantize_gpu.py)"}[name]
        lines += ["", f"### {title}", ""]
        if part.get("skipped"):
            lines.append(f"Skipped: {part['skipped']}.")
        elif part.get("error"):
            lines.append(f"Failed: {part['error']}")
        if name == "peak" and "tflops" in part:
            lines.append(f"bf16 matmul {part['n']}³: {part['median_ms']:.3f} ms, "
                         f"{part['tflops']:.3g} TFLOP/s (the peak that % of peak refers to).")
        elif name in ("resnet", "vit") and "variants" in part:
            lines += step_lines([part])
        elif name == "population" and "variants" in part:
            lines.append(f"{part['trials']} MNIST-1D MLPs (batch {part['batch']} each, own seed "
                         f"and data order) vmapped, against one; {part['steps_per_call']} steps "
                         "scanned per call on both sides.")
            lines += ["", *population_lines(part)]
        elif name in ("overhead", "quantize") and part.get("section"):
            lines += part["section"]
    return lines


# --- the parts ------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes: a CPU smoke run")
    parser.add_argument("--write", action="store_true",
                        help="write the section into --results and the report into --json")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "accelerator_suite.json"))
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--quantize", dest="quantize", action="store_true",
                        help="also run quantize_gpu.py (~2 min on an H200)")
    parser.add_argument("--skip-quantize", dest="quantize", action="store_false",
                        help="the default: quantize_gpu.py was run on its own")
    parser.add_argument("--repeats", type=int, help="timed repeats (default: 5, tiny 2)")
    parser.add_argument("--budget-s", type=float, default=270.0,
                        help="no part starts after this many seconds; subprocesses are killed")
    parser.add_argument("--overhead-args", help="overhead.py's arguments, e.g. "
                        "'--steps 1000 --repeats 3' (--json and --out are added)")
    args = parser.parse_args(argv)
    sizes = SIZES["tiny" if args.tiny else "full"]
    repeats = args.repeats or sizes["repeats"]
    if repeats < 1:
        parser.error("--repeats must be at least 1")
    defaults = {ROOT / "benchmarks/RESULTS.md", ROOT / "benchmarks/accelerator_suite.json"}
    if args.tiny and args.write and {Path(args.results).resolve(),
                                     Path(args.json).resolve()} & defaults:
        parser.error("--tiny shapes measure nothing worth keeping: pass --results and --json")

    if args.tiny:
        # XLA:CPU compiles threefry slowly (a ResNet-8 init: ~50 s against ~7 s on a busy
        # 2-core CPU); a smoke run's numbers mean nothing, its code paths are the same.
        jax.config.update("jax_default_prng_impl", "rbg")
    start = time.perf_counter()
    info = machine()
    print(f"device: {info['device_kind']} ({info['platform']}, {info['devices']} device(s)), "
          f"jax {info['jax']}", flush=True)
    scratch = Path(tempfile.mkdtemp(prefix="accelerator_suite_"))
    side = Path(args.json).parent if args.write else scratch  # where subprocess JSONs go
    report = {"machine": info, "argv": list(sys.argv[1:] if argv is None else argv),
              "tiny": args.tiny, "repeats": repeats, "budget_s": args.budget_s, "parts": {}}
    tag = "accelerator-" + re.sub(r"[^a-z0-9]+", "-", info["device_kind"].lower()).strip("-")

    def left() -> float:
        return args.budget_s - (time.perf_counter() - start)

    def save() -> None:
        report["elapsed_s"] = time.perf_counter() - start
        if args.write:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
            write_section(Path(args.results), tag, section(report, args.tiny))

    def run_part(name: str, fn: Callable[[], dict]) -> None:
        if name not in args.parts or (name == "quantize" and not args.quantize):
            report["parts"][name] = {"skipped": "not asked for" if name != "quantize" else
                                     "not asked for (--quantize runs it)"}
        elif left() <= 0:
            report["parts"][name] = {"skipped": f"out of the {args.budget_s:.0f} s budget"}
        else:
            print(f"\n== {name} ({left():.0f} s of budget left)", flush=True)
            part_start = time.perf_counter()
            try:
                part = fn()
            except Exception as error:  # noqa: BLE001 -- recorded; the other parts still run
                part = {"error": one_line(error),
                        "traceback": traceback.format_exc().splitlines()[-12:]}
            part["wall_s"] = time.perf_counter() - part_start
            part.setdefault("error", None)
            report["parts"][name] = part
        save()
        print(*section({**report, "parts": {name: report["parts"][name]}}, args.tiny)[4:],
              sep="\n", flush=True)

    def peak() -> dict:
        return matmul_peak(sizes["peak_n"], repeats, sizes["min_repeat_s"])

    def train_steps(part: str) -> Callable[[], dict]:
        def run() -> dict:
            model, hparams, shape, batch = sizes[part]
            return compare_steps(model, hparams, shape, batch, repeats, sizes["min_repeat_s"],
                                 report["parts"].get("peak", {}).get("tflops"))
        return run

    def population() -> dict:
        return population_throughput(sizes["trials"], sizes["steps_per_call"], repeats,
                                     sizes["min_repeat_s"])

    def overhead() -> dict:
        out_md, out_json = scratch / "overhead_section.md", side / "overhead.json"
        extra = args.overhead_args.split() if args.overhead_args else sizes["overhead_args"]
        result = run_script(["benchmarks/overhead.py", *extra, "--out", str(out_md),
                             "--json", str(out_json)], left())
        if result["returncode"] == 0 and out_json.exists():
            result["rows"] = json.loads(out_json.read_text())
        result["section"] = section_body(out_md)
        return result

    def quantize() -> dict:
        out_md = Path(args.results) if args.write else scratch / "RESULTS.md"
        result = run_script(["benchmarks/quantize_gpu.py", *(["--tiny"] if args.tiny else []),
                             "--repeats", "1" if args.tiny else "3", "--write", "--results",
                             str(out_md), "--json", str(side / "quantize_gpu.json")], left())
        result["section"] = [f"Written as its own section of {out_md.name} by this run."
                             if result["returncode"] == 0 else ""]
        return result

    for name, fn in zip(PARTS, (peak, train_steps("resnet"), overhead, population,
                                train_steps("vit"), quantize)):
        run_part(name, fn)
    report["elapsed_s"] = time.perf_counter() - start
    print(f"\nsuite done in {report['elapsed_s']:.0f} s"
          + (f"; wrote section {tag!r} of {args.results} and {args.json}" if args.write else ""))


if __name__ == "__main__":
    main()
