"""Write one benchmark's section of docs/benchmarks.md, between its begin/end markers, leaving the others alone."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def write_section(section: str, begin: str, end: str, doc: Path = DOC) -> None:
    """Replace the text from ``begin`` to ``end`` in ``doc`` by ``section`` (which holds both), or append it."""
    text = doc.read_text() if doc.exists() else "# Benchmarks\n\nResults of the scripts in `benchmarks/`.\n"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _m: section, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section
    doc.write_text(text.rstrip("\n") + "\n")
