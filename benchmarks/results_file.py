"""benchmarks/RESULTS.md is written in tagged sections, one per benchmark, each replaced on rerun.

Standard library only: the GPU machine runs the quantization benchmark without jaxopt_lab's
dependencies installed.
"""

from __future__ import annotations

from pathlib import Path


def write_section(path: Path, tag: str, lines: list[str]) -> str:
    """Replaces the `tag` section of `path` (between its begin/end markers), or appends it;
    returns the section as written."""
    begin, end = f"<!-- {tag}:begin -->", f"<!-- {tag}:end -->"
    block = "\n".join([begin, *lines, end])
    text = path.read_text() if path.exists() else "# Benchmark results\n\n"
    if begin in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)
    return block
