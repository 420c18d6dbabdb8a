"""benchmarks/quantize_gpu.py on CPU with tiny shapes: every variant timed, ratios sane, --write
writes its section and JSON where told (never into benchmarks/RESULTS.md from a tiny run)."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "quantize_gpu.py"
VARIANTS = ("bf16 x, bf16 W (baseline)", "int8 W, dequantized in graph",
            "w8a8: int8 x int8 -> int32", "bf16 (baseline)", "AQT int8 forward only",
            "AQT fully quantized int8")
RATIO = re.compile(r"\| ([\d.]+)× \(([\d.]+)–([\d.]+)\) \|")


def _module():
    if str(SCRIPT.parent) not in sys.path:  # as when run as a script: its sibling modules import
        sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("quantize_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_run_times_every_variant_and_writes_its_section(tmp_path):
    results, out_json = tmp_path / "RESULTS.md", tmp_path / "quantize.json"
    results.write_text("# Benchmark results\n\nkept\n")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--repeats", "2", "--write",
         "--results", str(results), "--json", str(out_json)],
        check=False, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = proc.stdout[proc.stdout.index("## Quantization on cpu"):]
    rows = [line for line in table.splitlines() if line.startswith("| ") and "×" in line
            and "M×K→N" not in line]
    for variant in VARIANTS:
        assert any(f"| {variant} |" in row for row in rows), (variant, table)
    for row in rows:
        match = RATIO.search(row)
        assert match, row
        ratios = [float(x) for x in match.groups()]
        assert all(math.isfinite(r) and r > 0 for r in ratios), row
        if "baseline" in row:
            assert ratios == [1.0, 1.0, 1.0], row

    text = results.read_text()
    assert text.startswith("# Benchmark results\n\nkept\n")
    assert text.count("<!-- quantize-cpu:begin -->") == 1
    assert "## Quantization on cpu (tiny smoke shapes)" in text
    data = json.loads(out_json.read_text())
    assert data["tiny"] and data["machine"]["platform"] == "cpu"
    assert {row["variant"] for row in data["rows"]} == set(VARIANTS)
    for row in data["rows"]:
        assert row["error"] is None, row
        assert len(row["seconds"]) == 2 and all(s > 0 for s in row["seconds"])
        assert math.isfinite(row["speedup"]) and row["speedup"] > 0
        assert 0 <= row["rel_error"] < 0.05, row  # int8 on random data: about 1e-2 at most


def test_write_section_replaces_its_own_block(tmp_path):
    module = _module()
    path = tmp_path / "RESULTS.md"
    path.write_text("# Benchmark results\n\n<!-- other:begin -->\nother\n<!-- other:end -->\n")
    module.write_section(path, "quantize-cpu", ["## Quantization on cpu", "first"])
    module.write_section(path, "quantize-cpu", ["## Quantization on cpu", "second"])
    text = path.read_text()
    assert "first" not in text and text.count("second") == 1
    assert "<!-- other:begin -->\nother\n<!-- other:end -->" in text


@pytest.mark.parametrize("where", ["--results", "--json"])
def test_tiny_refuses_to_write_the_repository_files(tmp_path, where):
    module = _module()
    other = {"--results": str(tmp_path / "R.md"), "--json": str(tmp_path / "q.json")}
    other[where] = str(ROOT / "benchmarks" / ("RESULTS.md" if where == "--results"
                                              else "quantize_gpu.json"))
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--tiny", "--write", "--results", other["--results"],
                     "--json", other["--json"]])
    assert exit_info.value.code == 2
