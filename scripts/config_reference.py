"""Write the configuration reference of the documentation site from ``conf/``: every config group, its options,
each option's top comment and every key (the YAML as shipped).

    python scripts/config_reference.py           # rewrite docs/reference/config.md
    python scripts/config_reference.py --check   # exit 1 when the page differs from what conf/ gives now

``tests/test_readme.py`` fails when the committed page is not what this script writes, so a config change is
one command away from its documentation.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
PAGE = REPO / "docs" / "reference" / "config.md"

#: The primary configs, by the command that composes them.
PRIMARY = {
    "kd-distill": "distill.yaml",
    "kd-train": "train.yaml",
    "kd-llm-distill": "llm_distill.yaml",
    "kd-llm-generate": "llm_generate.yaml",
}

HEADER = """\
# Configuration reference

<!-- written by scripts/config_reference.py from conf/; do not edit by hand -->

Every config group of `conf/`, its options and each option's keys, as shipped. `group=option` picks an option
(`kd-distill loss=dkd`), `group.key=value` overrides one of its keys (`kd-distill loss.temperature=2`), and
`+group.key=value` adds a key the option does not have. The primary configs (one per command) name the default
option of each group in their `defaults:` list. `kd-distill --cfg job` prints the composed config of any
command line. Regenerate this page with `python scripts/config_reference.py` after changing `conf/`.
"""


#: A full stop that ends a sentence: followed by a capital, a bracket or a backtick, or the end; not "et al.",
#: "e.g.", "i.e.", "vs.".
#: The longest summary of an option, in characters (the whole comment is in its YAML below).
MAX_SUMMARY = 200

SENTENCE_END = re.compile(r"(?<!\bal)(?<!e\.g)(?<!i\.e)(?<!\bvs)\.(?=\s+[A-Z(`]|$)")


def top_comment(text: str) -> list[str]:
    """The comment lines at the top of a YAML file, without ``#`` and without Hydra's ``# @package`` line."""
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        body = line[1:].removeprefix(" ")
        if not body.startswith("@package"):
            lines.append(body)
    return lines


def summary(text: str) -> str:
    """The first sentence of the top comment, as Markdown text (special characters escaped outside code)."""
    prose = []
    for line in top_comment(text):
        if not line.strip() or line.startswith(" ") or line.startswith(("kd-", "python ")):
            break  # an example command line or the end of the first paragraph
        prose.append(line.strip())
    comment = " ".join(prose)
    if not comment:
        return ""
    end = SENTENCE_END.search(comment)
    sentence = comment[: end.start() + 1] if end else comment
    if len(sentence) > MAX_SUMMARY:
        sentence = sentence[:MAX_SUMMARY].rsplit(" ", 1)[0] + " ..."
    return escape(sentence if sentence.endswith(".") else sentence.rstrip(":;,") + ".")


def escape(text: str) -> str:
    """``text`` with Markdown's emphasis, link and HTML characters escaped outside backtick spans."""
    parts = re.split(r"(`[^`]*`)", text)
    for i in range(0, len(parts), 2):
        part = parts[i].replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        parts[i] = re.sub(r"([\\*_\[\]|])", r"\\\1", part)
    return "".join(parts)


def fence(text: str) -> str:
    """``text`` in a YAML code block."""
    return f"```yaml\n{text.rstrip()}\n```\n"


def defaults(primary: Path) -> dict[str, str]:
    """``group -> default option`` from a primary config's ``defaults:`` list (``null`` choices left out)."""
    choices = {}
    in_defaults = False
    for line in primary.read_text().splitlines():
        if line.startswith("defaults:"):
            in_defaults = True
            continue
        if in_defaults and not line.startswith((" ", "-")):
            break
        match = re.match(r"\s*-\s*([\w/]+)\s*:\s*(\S+)", line)
        if in_defaults and match and match.group(2) != "null":
            choices[match.group(1)] = match.group(2)
    return choices


def groups(conf: Path) -> list[str]:
    """Every directory of ``conf`` that holds options, as a group path (``llm/method``), sorted."""
    found = {path.parent.relative_to(conf).as_posix() for path in conf.rglob("*.yaml") if path.parent != conf}
    return sorted(found)


def render(conf: Path = CONF) -> str:
    """The whole page."""
    out = [HEADER]
    out.append("## Primary configs\n")
    for command, name in PRIMARY.items():
        text = (conf / name).read_text()
        out.append(f"### `{command}`: `conf/{name}`\n")
        out.append(fence(text))
    per_command = {command: defaults(conf / name) for command, name in PRIMARY.items()}
    out.append("## Groups\n")
    out.append("| group | options |\n|---|---|")
    for group in groups(conf):
        options = ", ".join(f"`{path.stem}`" for path in sorted((conf / group).glob("*.yaml")))
        out.append(f"| [`{group}`](#{anchor(group)}) | {options} |")
    out.append("")
    for group in groups(conf):
        out.append(f"## `{group}`\n")
        chosen = [
            f"`{option}` ({command})" for command, choices in per_command.items() if (option := choices.get(group))
        ]
        program = "kd-llm-distill" if group.startswith("llm/") else "kd-distill"
        line = f"Pick one with `{program} {group}=<option>`"
        if group == "model":  # pulled in by teacher / student options, not by a primary config
            line = (
                "The networks of the teacher and student options (their `defaults: [/model@model: <option>]`); "
                "swap one with `kd-distill model@student.model=<option>` (or `model@teacher.model`)"
            )
        out.append(line + (f"; default: {', '.join(chosen)}." if chosen else "."))
        out.append("")
        for path in sorted((conf / group).glob("*.yaml")):
            text = path.read_text()
            described = summary(text)
            out.append(
                f"- [`{path.stem}`](#{anchor(f'{group}={path.stem}')})" + (f": {described}" if described else "")
            )
        out.append("")
        for path in sorted((conf / group).glob("*.yaml")):
            out.append(f"### `{group}={path.stem}`\n")
            out.append(f"`conf/{group}/{path.name}`\n")
            out.append(fence(path.read_text()))
    return "\n".join(out).rstrip() + "\n"


def anchor(heading: str) -> str:
    """The id Python-Markdown's ``toc`` gives a heading whose text is ``heading`` in backticks."""
    return re.sub(r"[-\s]+", "-", re.sub(r"[^\w\s-]", "", heading).strip().lower())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 if the page is not what conf/ gives now")
    args = parser.parse_args(argv)
    page = render()
    if args.check:
        if PAGE.read_text() != page:
            print(f"{PAGE.relative_to(REPO)} is stale: run python scripts/config_reference.py", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(page)
    print(f"wrote {PAGE.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
