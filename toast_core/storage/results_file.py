"""Benchmark sections of a results file (benchmarks/RESULTS.md): each script owns the text between
its own `<!-- key:start -->` and `<!-- key:end -->` markers and rewrites only that, so several
benchmarks (and hand-written notes outside the markers) share one file."""

from __future__ import annotations

import re
from pathlib import Path


def write_section(path: Path, key: str, body: str) -> None:
    """Replace (or append) the text between the markers of `key`; the file is read right before the
    write, so what others wrote to other sections meanwhile survives."""
    start, end = f"<!-- {key}:start -->", f"<!-- {key}:end -->"
    block = f"{start}\n{body.rstrip()}\n{end}\n"
    text = path.read_text() if path.exists() else "# Benchmark results\n\n"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end) + r"\n?", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + block
    path.write_text(text)
