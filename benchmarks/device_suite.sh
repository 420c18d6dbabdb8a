#!/usr/bin/env bash
# The one prepared run of benchmarks/accelerator_suite.py on a lent accelerator machine (the
# device tool's nvidia-h200), from the repository root:
#
#   run(command="bash benchmarks/device_suite.sh", carry=[".whl"], timeout_s=600)
#
# Expected: about 5 minutes, mostly compiling (XLA autotunes each fusion; ResNet-18 and ViT-S
# train steps take tens of seconds each, four of each). The suite's own budget (--budget-s,
# default 270 s) starts no part after it and kills its subprocesses there; the parts run in the
# order the goals need them (peak, ResNet-18, overhead, population, ViT-S), every part's
# rows are printed as they finish (tee-d to $OUT/accelerator_suite.log), and the JSON and the
# section are rewritten after each part, so a run cut short still brings back what it measured.
# timeout_s leaves room for the last part started before the budget ran out.
#
# That machine's image has Python 3.12 with jax/jaxlib (0.11.x), flax, optax and orbax; the rest
# of what jaxopt_lab imports travels as wheels in .whl/ (git-ignored, hence carry=[".whl"]),
# installed --no-deps beside the image's packages. MNIST-1D (the population and overhead parts)
# is generated into JAXOPT_LAB_DATA_DIR=/tmp/data on first use.
#
# Extra arguments go to accelerator_suite.py, e.g. `--quantize` (adds quantize_gpu.py
# --repeats 3, ~2 min: raise timeout_s), `--parts steps`, `--budget-s 300`.
#
# Back under $OUT: RESULTS.md (this tree's benchmarks/RESULTS.md with the section
# "## Accelerator suite on <device>" replaced or appended), accelerator_suite.json, overhead.json
# (benchmarks/overhead.py's rows, also inside accelerator_suite.json), accelerator_suite.log and
# env.txt. Copy RESULTS.md and accelerator_suite.json over benchmarks/ and commit them: only this
# script writes them.
set -euo pipefail
OUT=${OUT:-/tmp/suite_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export JAXOPT_LAB_DATA_DIR=${JAXOPT_LAB_DATA_DIR:-/tmp/data}

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}

{
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.used,memory.total \
        --format=csv || echo "no nvidia-smi"
    python3 -c 'import sys, jax, flax, optax; print(sys.version.split()[0], "jax", jax.__version__,
        "flax", flax.__version__, "optax", optax.__version__, jax.devices())' \
        || echo "(import failed)"
    python3 -c 'import jaxopt_lab.run.loop' && echo "jaxopt_lab imports" \
        || echo "(jaxopt_lab import failed)"
} 2>&1 | tee "$OUT/env.txt"

cp benchmarks/RESULTS.md "$OUT/RESULTS.md"
python3 benchmarks/accelerator_suite.py --write --results "$OUT/RESULTS.md" \
    --json "$OUT/accelerator_suite.json" "$@" 2>&1 | tee "$OUT/accelerator_suite.log"

# Then benchmarks/vectorized_sweep.py (populations of 1-256 MLPs and CNNs vs the same trials one at
# a time; ~2 min on an H200, estimated): no model starts after 480 s of this script, so with the
# suite's overrun it ends within timeout_s=600. Its JSON and section land in $OUT as above.
python3 benchmarks/vectorized_sweep.py --budget-s $(( SECONDS < 480 ? 480 - SECONDS : 0 )) \
    --results "$OUT/RESULTS.md" --json "$OUT/vectorized_sweep.json" 2>&1 \
    | tee "$OUT/vectorized_sweep.log"
