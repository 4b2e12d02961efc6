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
