"""The LM result scripts' kept records: each finished run carries the software versions it ran under, and a table
says when its records disagree on them (the same seed under other versions trains to other weights)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.experiments


@pytest.fixture(scope="module")
def llm_common():
    sys.path.insert(0, str(EXPERIMENTS))
    try:
        import llm_common

        yield llm_common
    finally:
        sys.path.remove(str(EXPERIMENTS))


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


def test_routing_records_refuse_another_reasoner(llm_common, tmp_path: Path) -> None:
    import llm_frontier

    reasoning = tmp_path / "llm_reasoning"
    assert llm_frontier.reasoner_report(reasoning) is None  # nothing kept: the records say which reasoner
    reasoning.mkdir()
    (reasoning / "teacher.json").write_text(json.dumps({"steps": 300, "pass_rate": 0.65, "settings": {}}))
    kept = llm_frontier.reasoner_report(reasoning)
    assert kept == {"steps": 300, "pass_rate": 0.65}
    record = {"run": "routed", "reasoner": kept}
    assert llm_frontier.same_reasoner(tmp_path / "r.json", record, kept) is record
    assert llm_frontier.same_reasoner(tmp_path / "r.json", record, None) is record
    with pytest.raises(SystemExit, match=r"r\.json was routed with the reasoner \{'steps': 150"):
        llm_frontier.same_reasoner(tmp_path / "r.json", {"reasoner": {"steps": 150, "pass_rate": 0.47}}, kept)
    assert "150 steps, 46.9% held-out" in llm_frontier.reasoner_text(
        [{"reasoner": {"steps": 150, "pass_rate": 0.46875}}]
    )
    assert "not recorded" in llm_frontier.reasoner_text([{"run": "routed"}])
