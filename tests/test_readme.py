"""The README's Python example runs (with tiny budgets)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def test_python_api_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = README.read_text()
    code = re.search(r"## Python API\n\n```python\n(.*?)```", text, re.DOTALL).group(1)
    code = re.sub(r"max_epochs=\d+", "max_epochs=1, enable_progress_bar=False, logger=False", code)
    code = code.replace("transfer_samples=20_000", "transfer_samples=500")
    monkeypatch.chdir(tmp_path)  # the example writes data and checkpoints relative to the cwd
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    assert namespace["module"].teacher is namespace["teacher"]
    assert not namespace["teacher"].training


def readme_commands(program: str) -> list[list[str]]:
    """The overrides of every single-run ``<program> ...`` line in the README's bash blocks (comments,
    sweeps, ``--cfg`` and lines with placeholders left out)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.DOTALL):
        for line in block.splitlines():
            words = line.split("#")[0].split()
            runnable = not {"-m", "--cfg"} & set(words) and "<" not in line and not line.rstrip().endswith("\\")
            if words[:1] == [program] and runnable:
                commands.append(words[1:])
    return commands


@pytest.mark.parametrize(("program", "config"), [("kd-distill", "distill"), ("kd-llm-distill", "llm_distill")])
def test_readme_commands_compose(program: str, config: str, tmp_path: Path) -> None:
    from tests.conftest import compose_config

    commands = readme_commands(program)
    assert commands
    for overrides in commands:
        compose_config(tmp_path, overrides, config_name=config)


def test_readme_llm_commands_use_todays_spelling_and_pass_the_scheme_checks(tmp_path: Path) -> None:
    """Every kd-llm-distill line of the README composes, is not an old spelling, and its scheme accepts its
    loss, teachers and cache (the checks kd-llm-distill runs before building a model)."""
    from hydra.utils import instantiate

    from kd_lightning.cli.renamed import LLM_RENAMED, renamed
    from kd_lightning.recipes.llm_components import scheme_factory, teacher_names
    from kd_lightning.recipes.llm_preflight import check_scheme
    from tests.conftest import compose_config

    for overrides in readme_commands("kd-llm-distill"):
        assert not [o for o in overrides if renamed(o, LLM_RENAMED)], overrides
        cfg = compose_config(tmp_path, overrides, config_name="llm_distill")
        factory, loss_cfg = scheme_factory(cfg)
        loss = instantiate(loss_cfg) if loss_cfg is not None else None
        remote = "RemoteTeacher" in str(cfg.llm.teacher.get("model", {}).get("_target_", ""))
        check_scheme(factory, loss, teacher_names(cfg.llm.teacher), bool(cfg.llm.teacher_cache), remote)
