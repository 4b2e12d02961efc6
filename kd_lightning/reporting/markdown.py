"""Markdown files that several scripts write into: each owns a section between its own markers."""

from __future__ import annotations

from pathlib import Path


def write_section(path: Path, text: str, section: str, title: str = "# Performance") -> None:
    """Replace the ``section`` of ``path`` (between ``<!-- section:begin -->`` and ``<!-- section:end -->``)
    by ``text``, keeping the rest; a missing section is appended, a missing file starts with ``title``."""
    begin, end = f"<!-- {section}:begin -->\n", f"\n<!-- {section}:end -->"
    current = path.read_text() if path.is_file() else f"{title}\n"
    if begin not in current:
        current += f"\n{begin}{end}\n"
    head, rest = current.split(begin, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(head + begin + text + end + rest.split(end, 1)[1])
