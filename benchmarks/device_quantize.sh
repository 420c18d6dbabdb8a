#!/usr/bin/env bash
# The one prepared run of benchmarks/quantize_gpu.py on a lent GPU machine (the device tool's
# nvidia-h200), from the repository root:
#
#   run(command="bash benchmarks/device_quantize.sh", timeout_s=540)
#
# Expected: a few minutes, mostly compiling (XLA autotunes each GEMM fusion); the rows of each
# shape are printed (and tee-d to $OUT/quantize_gpu.log) as it finishes, so a run cut short still
# says what it measured.
#
# Extra arguments go to quantize_gpu.py (e.g. `--repeats 3`). That machine's image has Python
# 3.12 with its own jax/jaxlib (0.11.x), flax, absl-py and numpy, but no aqtp and no registry:
# aqtp is pure Python, so its wheel travels with the tree (benchmarks/wheels/
# aqtp-0.9.0-py3-none-any.whl, 0.9 MB, committed; no `carry` needed; were benchmarks/wheels ever
# git-ignored, pass carry=["benchmarks/wheels"]) and is installed --no-deps beside the image's
# packages. Remake it with
#   pip download aqtp==0.9.0 --no-deps --python-version 3.12 --only-binary=:all: -d benchmarks/wheels
# If aqtp 0.9.0 does not import or run under the image's newer jax, the serving rows still come
# back and the AQT rows say why.
#
# Back under $OUT: RESULTS.md (this tree's benchmarks/RESULTS.md with the section
# "## Quantization on <device>" replaced or appended), quantize_gpu.json, quantize_gpu.log and
# env.txt. Copy the first two over benchmarks/ and commit them: only this script writes them.
set -euo pipefail
OUT=${OUT:-/tmp/quantize_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/aqt_site benchmarks/wheels/aqtp-*.whl
export PYTHONPATH=/tmp/aqt_site${PYTHONPATH:+:$PYTHONPATH}

{
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.used,memory.total \
        --format=csv || echo "no nvidia-smi"
    python3 -c 'import sys, jax, flax, aqt.jax.v2.config; print(sys.version.split()[0], "jax",
        jax.__version__, "flax", flax.__version__, jax.devices())' || echo "(import failed)"
} 2>&1 | tee "$OUT/env.txt"

cp benchmarks/RESULTS.md "$OUT/RESULTS.md"
python3 benchmarks/quantize_gpu.py --write --results "$OUT/RESULTS.md" \
    --json "$OUT/quantize_gpu.json" "$@" 2>&1 | tee "$OUT/quantize_gpu.log"
