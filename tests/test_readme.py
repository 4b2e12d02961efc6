"""Every command and code block of README.md and of the documentation site (docs/, the run records left out)
is exercised: command lines compose (sweeps with their first values) and pass the checks their program runs
before building a model, Python blocks run with tiny budgets unless marked ``<!-- not-run: reason -->``, YAML
blocks parse, relative links resolve, and the generated configuration reference is current."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import re
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import yaml

from tests.doc_pages import (
    DOCS,
    README,
    REPO,
    Block,
    Command,
    anchors,
    blocks,
    commands,
    links,
    name,
    not_run_marks,
    pages,
    shell_lines,
)

#: The Python API example: the first Python block after this heading of this page.
API_PAGE, API_HEADING = DOCS / "python-api.md", "## Python API"
MAX_README_LINES = 250


def tiny(code: str) -> str:
    """A Python block with tiny budgets: one epoch without progress bar or logger, a 500-sample transfer set."""
    code = re.sub(r"max_epochs=\d+", "max_epochs=1, enable_progress_bar=False, logger=False", code)
    return code.replace("transfer_samples=20_000", "transfer_samples=500")


def api_example() -> Block:
    text = API_PAGE.read_text()
    line = text[: text.index(API_HEADING + "\n")].count("\n") + 1
    return next(b for b in blocks(API_PAGE, "python") if b.line > line)


# Python ---------------------------------------------------------------------------------------------------


def test_python_api_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    example = api_example()
    assert example.not_run is None
    monkeypatch.chdir(tmp_path)  # the example writes data and checkpoints relative to the cwd
    namespace: dict = {}
    exec(compile(tiny(example.code), example.where, "exec"), namespace)
    assert namespace["module"].teacher is namespace["teacher"]
    assert not namespace["teacher"].training


def python_pages() -> list[Path]:
    return [p for p in pages() if blocks(p, "python")]


@pytest.mark.parametrize("page", python_pages(), ids=name)
def test_python_blocks_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A page's Python blocks run in order, in one namespace and a fresh working directory (a tutorial's later
    block may use an earlier one's files); the API example runs in its own test."""
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__doc_block__"}
    ran = 0
    for block in blocks(page, "python"):
        if block.not_run is not None or block == api_example():
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            exec(compile(tiny(block.code), block.where, "exec"), namespace)
        ran += 1
    assert ran or page == API_PAGE or all(b.not_run for b in blocks(page, "python"))


def test_every_skipped_block_says_why() -> None:
    """A ``not-run`` mark names its reason and sits right above a code block (a stale mark is an error)."""
    problems = []
    for page in pages():
        for line, reason, followed in not_run_marks(page):
            if not reason:
                problems.append(f"{name(page)}:{line}: not-run without a reason")
            if not followed:
                problems.append(f"{name(page)}:{line}: not-run mark with no code block right below it")
    assert not problems, "\n".join(problems)


def test_yaml_blocks_parse() -> None:
    problems = []
    for page in pages():
        for block in blocks(page, "yaml"):
            try:
                yaml.safe_load(block.code)
            except yaml.YAMLError as error:
                problems.append(f"{block.where}: {error}")
    assert not problems, "\n".join(problems)


# Commands -------------------------------------------------------------------------------------------------


def single_run(command: Command) -> list[str] | None:
    """The overrides of one job of ``command``: ``-m`` and ``--cfg job`` dropped, each swept key at its first
    value; None for a line that cannot compose as written (placeholders, a user's config directory)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if command.has_placeholder or "--config-dir" in command.args:
        return None
    words = [w for w in command.args if w != "-m"]
    if "--cfg" in words:
        at = words.index("--cfg")
        del words[at : at + 2]
    overrides = []
    for override in OverridesParser.create().parse_overrides(words):
        if override.is_sweep_override():
            overrides.append(f"{override.get_key_element()}={next(override.sweep_string_iterator())}")
        else:
            overrides.append(override.input_line)
    return overrides


def runnable(program: str) -> Iterator[tuple[Command, list[str]]]:
    for command in commands(program):
        overrides = single_run(command)
        if overrides is not None:
            yield command, overrides


@pytest.mark.parametrize(
    ("program", "config"),
    [
        ("kd-distill", "distill"),
        ("kd-llm-distill", "llm_distill"),
        ("kd-train", "train"),
        ("kd-llm-generate", "llm_generate"),
    ],
)
def test_doc_commands_compose(program: str, config: str) -> None:
    """Every line of ``program`` in a bash block of the README or a docs page composes (a sweep: one job)."""
    from hydra import compose, initialize_config_dir

    from kd_lightning.cli.common import CONFIG_DIR

    lines = list(runnable(program))
    assert lines, f"no {program} line in the documentation"
    failures = []
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        for command, overrides in lines:
            try:
                compose(config_name=config, overrides=overrides)
            except Exception as error:  # collect every broken line, not just the first
                failures.append(f"{command.where}\n    {type(error).__name__}: {error}")
    assert not failures, "\n".join(failures)


def test_readme_commands_compose_with_the_run_directory_set(tmp_path: Path) -> None:
    """The README's own lines, composed as the CLI composes them (tests.conftest.compose_config)."""
    from tests.conftest import compose_config

    programs = {"kd-distill": "distill", "kd-llm-distill": "llm_distill"}
    readme = [(c, o, programs[p]) for p in programs for c, o in runnable(p) if c.block.path == README]
    assert {config for _, _, config in readme} == set(programs.values())
    for _command, overrides, config in readme:
        compose_config(tmp_path, overrides, config_name=config)


def test_doc_commands_use_todays_spelling() -> None:
    from kd_lightning.cli.renamed import CLASSIFIER_RENAMED, LLM_RENAMED, renamed

    tables = {"kd-distill": CLASSIFIER_RENAMED, "kd-train": CLASSIFIER_RENAMED, "kd-llm-distill": LLM_RENAMED}
    old = [
        f"{command.where}: {message}"
        for program, table in tables.items()
        for command in commands(program)
        for override in command.args
        if (message := renamed(override, table))
    ]
    assert not old, "\n".join(old)


def test_doc_llm_commands_pass_the_scheme_checks(tmp_path: Path) -> None:
    """Every kd-llm-distill line's scheme accepts its loss, teachers and cache (the checks kd-llm-distill runs
    before building a model)."""
    from hydra.utils import instantiate

    from kd_lightning.recipes.llm_components import scheme_factory, teacher_names
    from kd_lightning.recipes.llm_preflight import check_scheme
    from tests.conftest import compose_config

    lines = list(runnable("kd-llm-distill"))
    assert len(lines) >= 10
    for _command, overrides in lines:
        cfg = compose_config(tmp_path, overrides, config_name="llm_distill")
        factory, loss_cfg = scheme_factory(cfg)
        loss = instantiate(loss_cfg) if loss_cfg is not None else None
        remote = "RemoteTeacher" in str(cfg.llm.teacher.get("model", {}).get("_target_", ""))
        check_scheme(factory, loss, teacher_names(cfg.llm.teacher), bool(cfg.llm.teacher_cache), remote)


@pytest.mark.parametrize(
    ("program", "module"),
    [
        ("kd-report", "kd_lightning.cli.report"),
        ("kd-sweep-report", "kd_lightning.cli.sweep_report"),
        ("kd-export", "kd_lightning.cli.export"),
    ],
)
def test_doc_report_commands_parse(program: str, module: str, tmp_path: Path) -> None:
    """Every kd-report / kd-sweep-report / kd-export line parses: its placeholder filled with a directory, its options
    among the program's (read from its --help, which exits before anything runs)."""
    main = importlib.import_module(module).main
    help_text = io.StringIO()
    with contextlib.redirect_stdout(help_text), pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    lines = commands(program)
    assert lines
    for command in lines:
        args = re.sub(r"<[^<>]+>", str(tmp_path), " ".join(command.args)).split()
        assert [a for a in args if not a.startswith("-")][:1] == [str(tmp_path)], command.where
        for option in (a.split("=")[0] for a in args if a.startswith("--")):
            assert re.search(rf"{re.escape(option)}\b", help_text.getvalue()), f"{command.where}: no {option}"


def test_doc_scripts_exist() -> None:
    """Every ``python scripts/...`` / ``bash scripts/...`` / ``python experiments/...`` named on a page (in a block or
    in the text) or in experiments/' READMEs exists."""
    readmes = sorted((REPO / "experiments").rglob("*.md"))
    missing = [
        f"{name(page)}: {match.group(0)}"
        for page in [*pages(), *readmes]
        for match in re.finditer(r"\b(?:python|bash) ((?:scripts|experiments)/[\w/.-]+\.(?:py|sh))", page.read_text())
        if not (REPO / match.group(1)).is_file()
    ]
    assert not missing, "\n".join(missing)


# Pages ----------------------------------------------------------------------------------------------------


def test_readme_is_a_landing_page() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; move detail into docs/"
    text = "\n".join(lines)
    assert text.count("<!-- results:begin -->") == 1 and text.count("<!-- results:end -->") == 1
    block = text.split("<!-- results:begin -->\n", 1)[1].split("<!-- results:end -->", 1)[0]
    results = (DOCS / "results" / "default.md").read_text()
    assert block.strip() in results, "the README's results block differs from docs/results/default.md"


def test_relative_links_resolve() -> None:
    """Every relative link of the README and the docs pages names an existing file, and a heading of it when
    it names an anchor (as mkdocs or GitHub spell anchors)."""
    broken = []
    for page in pages():
        for line, target in links(page):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            path_part, _, anchor = target.partition("#")
            resolved = (page.parent / path_part).resolve() if path_part else page
            where = f"{name(page)}:{line}: {target}"
            if not resolved.exists():
                broken.append(f"{where} (no such file)")
            elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
                broken.append(f"{where} (no such heading)")
    assert not broken, "\n".join(broken)


class _MkdocsLoader(yaml.SafeLoader):
    """mkdocs.yml's ``!!python/name:`` tags read as plain strings."""


_MkdocsLoader.add_multi_constructor("tag:yaml.org,2002:python/", lambda loader, suffix, node: suffix)


def nav_pages(nav: object) -> Iterator[str]:
    if isinstance(nav, str):
        yield nav
    elif isinstance(nav, dict):
        for value in nav.values():
            yield from nav_pages(value)
    elif isinstance(nav, list):
        for item in nav:
            yield from nav_pages(item)


def test_every_docs_page_is_in_the_site_nav() -> None:
    config = yaml.load((REPO / "mkdocs.yml").read_text(), Loader=_MkdocsLoader)
    assert config["docs_dir"] == "docs"
    listed = set(nav_pages(config["nav"]))
    on_disk = {p.relative_to(DOCS).as_posix() for p in pages() if p != README}
    assert on_disk - listed == set(), "pages missing from mkdocs.yml's nav"
    assert listed - on_disk == set(), "nav entries without a page"
    assert all((DOCS / page).is_file() for page in listed)


def load_script(script: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_script_{script}", REPO / "scripts" / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_config_reference_is_current() -> None:
    """docs/reference/config.md is what scripts/config_reference.py writes from conf/ now."""
    script = load_script("config_reference")
    assert script.PAGE.read_text() == script.render(), "stale: run python scripts/config_reference.py"


def test_config_reference_lists_every_option() -> None:
    script = load_script("config_reference")
    page = script.PAGE.read_text()
    conf = REPO / "conf"
    options = [p for p in conf.rglob("*.yaml") if p.parent != conf]
    assert len(options) > 100
    for path in options:
        group = path.parent.relative_to(conf).as_posix()
        assert f"### `{group}={path.stem}`" in page, path


# Smoke runs ------------------------------------------------------------------------------------------------


def smoke_commands() -> list[Command]:
    """The documentation's smoke tests: every ``kd-distill`` line with ``debug=fast_dev_run`` and every
    ``kd-llm-distill`` line on the tiny random models, with no placeholder to fill in."""
    found = [c for c in commands("kd-distill") if "debug=fast_dev_run" in c.args]
    found += [c for c in commands("kd-llm-distill") if {"llm/teacher=tiny", "llm/student=tiny"} <= set(c.args)]
    return [c for c in found if not c.has_placeholder and "-m" not in c.args]


def smoke_param(command: Command) -> object:
    """Runs needing the vision extra (torchvision / timm models) run in its environment (pytest -m vision)."""
    vision = any(
        re.fullmatch(r"(teacher|student)=(torchvision|timm|resnet50|resnet18|mobilenet_v3\w*)", a) for a in command.args
    )
    return (
        pytest.param(command, marks=pytest.mark.vision, id=command.where)
        if vision
        else pytest.param(command, id=command.where)
    )


@pytest.mark.parametrize("command", [smoke_param(c) for c in smoke_commands()])
def test_doc_smoke_runs_run(command: Command, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A page's smoke test runs as its reader runs it: the page's Python blocks first (they make the toy files
    the command reads), in one working directory, then the command as a process, which must finish and report."""
    import os

    from tests.warm_process import run_console_script

    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__doc_block__"}
    for block in blocks(command.block.path, "python"):
        if block.not_run is None and block != api_example() and block.line < command.block.line:
            with contextlib.redirect_stdout(io.StringIO()):
                exec(compile(tiny(block.code), block.where, "exec"), namespace)
    env = {
        **os.environ,
        "KD_LIGHTNING_HOME": str(tmp_path / "home"),
        "PYTHONWARNINGS": "ignore",
        "PYTHONPATH": str(REPO),
    }
    program = "kd-distill" if command.line.lstrip().startswith("kd-distill") else "kd-llm-distill"
    args = [*command.args, f"hydra.run.dir={tmp_path / 'run'}", "+trainer.enable_progress_bar=false"]
    result = run_console_script(program, args, env, tmp_path, timeout=300)
    assert result.returncode == 0, f"{command.where}\n{result.stderr[-3000:]}"
    assert (tmp_path / "run" / "summary.json").is_file(), command.where


def test_refresh_results_reruns_every_cpu_table() -> None:
    """Every table a script wrote into README / docs (its ``Command:`` line) is re-run by
    scripts/refresh_results.sh with the same arguments, except those it names as run elsewhere: GPU tables,
    the CIFAR-100 protocol (needs the data) and the LM studies (experiments/README.md)."""
    script = (REPO / "scripts" / "refresh_results.sh").read_text()
    refreshed = {" ".join(line.replace("\\\n", " ").split()) for line in shell_lines(script.replace("$PY", "python"))}
    elsewhere = ("--device cuda", "experiments/", "cifar100_protocol", "gpu_check", "bench/llm_", "cifar_throughput")
    missing = []
    for page in pages():
        for match in re.finditer(r"Command: `(python (?:scripts|experiments)/[^`]+)`", page.read_text()):
            command = " ".join(match.group(1).split(" -- ")[0].split())
            command = re.sub(r' --conditions "[^"]*"', "", command)  # how those runs were timed, not what to run
            if not any(mark in command for mark in elsewhere) and not any(command in line for line in refreshed):
                missing.append(f"{name(page)}: {command}")
    assert not missing, "\n".join(missing)
