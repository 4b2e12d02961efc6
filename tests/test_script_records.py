"""The LM result scripts' kept records: each finished run carries the software versions it ran under, and a table
says when its records disagree on them (the same seed under other versions trains to other weights)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def llm_common():
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import llm_common

        yield llm_common
    finally:
        sys.path.remove(str(REPO / "scripts"))


def test_finished_runs_once_and_keeps_the_versions(llm_common, tmp_path: Path) -> None:
    calls = []

    def make() -> dict:
        calls.append(1)
        return {"pass_rate": 0.5}

    path = tmp_path / "run.json"
    first, again = llm_common.finished(path, make), llm_common.finished(path, make)
    assert first == again == json.loads(path.read_text()) and len(calls) == 1
    assert first["pass_rate"] == 0.5 and set(first["software"]) == {"torch", "transformers", "lightning"}
    assert first["software"]["torch"] == llm_common.software()["torch"]


def test_software_summary_flags_mixed_versions(llm_common) -> None:
    now = {"software": {"torch": "2.13.0", "transformers": "5.25.0", "lightning": "2.6.6"}}
    assert llm_common.software_summary([now, now]) == "Software: torch 2.13.0, transformers 5.25.0, lightning 2.6.6."
    mixed = llm_common.software_summary([now, {"pass_rate": 0.1}])
    assert "2 version sets" in mixed and "not recorded" in mixed and "torch 2.13.0" in mixed
