"""README.md and the documentation site (docs/) read as the tests need them: fenced code blocks with the
``<!-- not-run: reason -->`` mark above them, the command lines of their bash blocks, relative links and the
anchors of headings."""

from __future__ import annotations

import re
import shlex
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = REPO / "docs"
#: The mark of a code block that the tests do not run, with the reason: ``<!-- not-run: needs a GPU -->``.
NOT_RUN = re.compile(r"^[ \t]*<!--\s*not-run:(?P<reason>.*?)-->", re.M | re.S)
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.M | re.S)
LINK = re.compile(r"!?\[(?P<text>[^\]]*)\]\((?P<target>[^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^(?P<level>#{1,6})\s+(?P<text>.+?)\s*#*\s*$", re.M)


def pages() -> list[Path]:
    """README.md and every Markdown page under docs/ (recursively)."""
    return [README, *sorted(DOCS.rglob("*.md"))]


def name(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


@dataclass(frozen=True)
class Block:
    """One fenced code block: its page, first line (1-based, the fence's), language, code (dedented to the
    fence) and the reason of a ``not-run`` mark right above it (None: no mark)."""

    path: Path
    line: int
    lang: str
    code: str
    not_run: str | None

    @property
    def where(self) -> str:
        return f"{name(self.path)}:{self.line}"


def blocks(path: Path, lang: str | None = None) -> list[Block]:
    """The fenced code blocks of ``path`` (of language ``lang`` when given), in page order."""
    text = path.read_text()
    found = []
    for match in FENCE.finditer(text):
        indent = match.group("indent")
        code = "".join(line.removeprefix(indent) for line in match.group("body").splitlines(keepends=True))
        before = text[: match.start()].rstrip().rsplit("\n", 1)[-1].strip()
        mark = NOT_RUN.fullmatch(before)
        block = Block(
            path=path,
            line=text.count("\n", 0, match.start()) + 1,
            lang=match.group("lang"),
            code=code,
            not_run=mark.group("reason").strip() if mark else None,
        )
        if lang is None or block.lang == lang:
            found.append(block)
    return found


def not_run_marks(path: Path) -> list[tuple[int, str, bool]]:
    """Every ``not-run`` mark of ``path``: (line, reason, whether a fenced block follows it directly)."""
    text = path.read_text()
    marks = []
    for match in NOT_RUN.finditer(text):
        after = text[match.end() :].lstrip(" \t")
        followed = after.startswith("\n") and after[1:].lstrip(" \t").startswith("```")
        marks.append((text.count("\n", 0, match.start()) + 1, match.group("reason").strip(), followed))
    return marks


def shell_lines(code: str) -> Iterator[str]:
    """The logical lines of a shell snippet: backslash continuations joined."""
    pending = ""
    for line in code.splitlines():
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        yield pending + line
        pending = ""
    if pending:
        yield pending


@dataclass(frozen=True)
class Command:
    """One command line of a bash block: its block, the whole line and its words after the program."""

    block: Block
    line: str
    args: list[str]

    @property
    def where(self) -> str:
        return f"{self.block.where}: {self.line.strip()}"

    @property
    def has_placeholder(self) -> bool:
        """``<run dir>``-style placeholders a reader fills in."""
        return bool(re.search(r"<[^<>]+>", self.line))


def commands(program: str) -> list[Command]:
    """Every ``<program> ...`` line in the bash blocks of every page, comments dropped."""
    found = []
    for path in pages():
        for block in blocks(path, "bash"):
            for line in shell_lines(block.code):
                words = shlex.split(line, comments=True)
                if words[:1] == [program]:
                    found.append(Command(block, line, words[1:]))
    return found


def links(path: Path) -> list[tuple[int, str]]:
    """(line, target) of every link and image of ``path`` outside code blocks and inline code."""
    text = path.read_text()
    text = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    text = re.sub(r"`[^`\n]*`", lambda m: " " * len(m.group(0)), text)
    return [(text.count("\n", 0, m.start()) + 1, m.group("target")) for m in LINK.finditer(text)]


def heading_text(raw: str) -> str:
    """The text a reader sees of a Markdown heading: code, links and emphasis marks removed."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", raw)
    return text.replace("`", "").replace("*", "")


def site_slug(text: str) -> str:
    """The anchor Python-Markdown's ``toc`` extension (mkdocs) gives a heading."""
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    return re.sub(r"[-\s]+", "-", re.sub(r"[^\w\s-]", "", text).strip().lower())


def github_slug(text: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, each space a hyphen."""
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of ``path``'s headings, as mkdocs and as GitHub spell them."""
    text = FENCE.sub("", path.read_text())
    titles = [heading_text(m.group("text")) for m in HEADING.finditer(text)]
    return {site_slug(t) for t in titles} | {github_slug(t) for t in titles}
