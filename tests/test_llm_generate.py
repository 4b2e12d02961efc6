"""Black-box sequence-level KD data: batched teacher generation into a resumable, verifiable JSONL file."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from kd_lightning.engine.errors import ConfigError
from kd_lightning.llm.generation import GenerationSettings, generate_file
from kd_lightning.llm.models import char_tokenizer, random_llama
from kd_lightning.llm.prompts import Prompt, make_prompts
from kd_lightning.llm.records import keep_correct, read_records, score_file
from kd_lightning.llm.remote import RemoteTeacher

SETTINGS = GenerationSettings(max_new_tokens=6)


@pytest.fixture(scope="module")
def teacher():
    return random_llama(vocab_size=128, num_layers=2, seed=0), char_tokenizer()


def test_generation_is_batched_deterministic_and_resumable(teacher, tmp_path: Path) -> None:
    model, tokenizer = teacher
    prompts = make_prompts("mixed", 5, seed=0)
    once = tmp_path / "once.jsonl"
    report = generate_file(model, tokenizer, prompts, once, SETTINGS, batch_size=2, progress=False)
    assert (report.prompts, report.completions, report.generated) == (5, 5, 5)

    resumed = tmp_path / "resumed.jsonl"
    generate_file(model, tokenizer, prompts[:2], resumed, SETTINGS, batch_size=2, progress=False)
    with resumed.open("a") as sink:
        sink.write('{"id": "cut sho')  # an interrupted write
    report = generate_file(model, tokenizer, prompts, resumed, SETTINGS, batch_size=2, progress=False)
    assert report.generated == 3 and report.completions == 5
    assert read_records(resumed) == read_records(once)  # same completions, no duplicates
    record = read_records(once)[1]
    assert set(record) == {"id", "prompt", "kind", "answer", "sample", "completion", "correct"}
    assert record["kind"] == "arithmetic" and record["correct"] is False


def test_resuming_with_other_settings_or_model_is_refused(teacher, tmp_path: Path) -> None:
    model, tokenizer = teacher
    path, prompts = tmp_path / "data.jsonl", make_prompts("instructions", 2, seed=0)
    generate_file(model, tokenizer, prompts, path, SETTINGS, progress=False)
    with pytest.raises(ConfigError, match=r"generate\.out_file=.*max_new_tokens"):
        generate_file(model, tokenizer, prompts, path, GenerationSettings(max_new_tokens=7), progress=False)
    other = random_llama(vocab_size=128, num_layers=3)
    with pytest.raises(ConfigError, match=r"generate\.out_file=.* another teacher .*use a new generate\.out_file"):
        generate_file(other, tokenizer, prompts, path, SETTINGS, progress=False)


def test_a_file_without_its_settings_or_by_another_remote_teacher_is_refused(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("kd_lightning.llm.generation.complete", lambda model, tok, batch, s: [["4"] for _ in batch])
    prompts, tokenizer = make_prompts("arithmetic", 2, seed=0), char_tokenizer()
    served = RemoteTeacher("http://127.0.0.1:9/v1", "teacher-a")  # never asked: `complete` is replaced
    path = tmp_path / "remote.jsonl"
    generate_file(served, tokenizer, prompts, path, SETTINGS, progress=False)
    meta = path.with_name("remote.jsonl.meta.json")
    assert json.loads(meta.read_text())["model"] == "remote:http://127.0.0.1:9/v1:teacher-a"
    assert generate_file(served, tokenizer, prompts, path, SETTINGS, progress=False).generated == 0  # resumed
    other = RemoteTeacher("http://127.0.0.1:9/v1", "teacher-b")
    with pytest.raises(ConfigError, match=r"generate\.out_file=.* another teacher .*'remote:.*teacher-a'"):
        generate_file(other, tokenizer, prompts, path, SETTINGS, progress=False)
    moved = RemoteTeacher("http://10.0.0.1:8000/v1", "teacher-a")  # the same name on another server
    with pytest.raises(ConfigError, match=r"another teacher"):
        generate_file(moved, tokenizer, prompts, path, SETTINGS, progress=False)
    meta.write_text('{"max_new_tok')  # damaged sidecar
    with pytest.raises(ConfigError, match=r"generate\.out_file=.* damaged settings file remote\.jsonl\.meta\.json"):
        generate_file(served, tokenizer, prompts, path, SETTINGS, progress=False)
    meta.unlink()  # a file made elsewhere: no sidecar
    with pytest.raises(ConfigError, match=r"generate\.out_file=.* has no settings file .*use a new generate\.out_file"):
        generate_file(served, tokenizer, prompts, path, SETTINGS, progress=False)
    assert not meta.exists() and len(read_records(path)) == 2  # nothing written, nothing extended
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")  # an empty file has nothing to mix with: generated into
    assert generate_file(served, tokenizer, prompts, empty, SETTINGS, progress=False).generated == 2


def test_sampling_several_completions_per_prompt(teacher, tmp_path: Path) -> None:
    model, tokenizer = teacher
    settings = GenerationSettings(max_new_tokens=6, do_sample=True, temperature=1.0, num_samples=3, seed=1)
    report = generate_file(model, tokenizer, make_prompts("arithmetic", 2, seed=0), tmp_path / "s.jsonl", settings)
    assert report.completions == 6 and report.checkable == 6
    with pytest.raises(ConfigError, match=r"generate\.do_sample=true"):
        GenerationSettings(num_samples=2)


def test_filter_keeps_correct_answers_and_fails_when_none_survive(teacher, tmp_path: Path, monkeypatch) -> None:
    model, tokenizer = teacher
    prompts = [Prompt("a", "What is 2 + 3?", "arithmetic", 5), Prompt("b", "What is 2 + 2?", "arithmetic", 4)]
    monkeypatch.setattr("kd_lightning.llm.generation.complete", lambda *a: [["The answer is 5."], ["It is 5."]])
    report = generate_file(model, tokenizer, prompts, tmp_path / "ok.jsonl", SETTINGS, filter_correct=True)
    assert (report.checkable, report.correct, report.pass_rate) == (2, 1, 0.5)
    kept = keep_correct(read_records(tmp_path / "ok.jsonl"), "llm.data.only_correct")
    assert [record["id"] for record in kept] == ["a"]

    monkeypatch.setattr("kd_lightning.llm.generation.complete", lambda *a: [["6"], ["no idea"]])
    with pytest.raises(ConfigError, match=r"kept none of 2 .*generate\.num_samples.*generate\.filter_correct=false"):
        generate_file(model, tokenizer, prompts, tmp_path / "bad.jsonl", SETTINGS, filter_correct=True)
    with pytest.raises(ConfigError, match=r"llm\.data\.only_correct=false"):
        keep_correct(read_records(tmp_path / "bad.jsonl"), "llm.data.only_correct")


def test_report_separates_the_answer_line_from_the_last_number_fallback(teacher, tmp_path: Path, monkeypatch) -> None:
    model, tokenizer = teacher
    prompts = [Prompt(name, "What is 3 + 4?", "arithmetic", 7) for name in "abcd"]
    completions = [["3 + 4 = 7. The answer is 7."], ["3 + 4 = 7"], ["The answer is 8."], ["1. 1. 1."]]
    monkeypatch.setattr("kd_lightning.llm.generation.complete", lambda *a: completions)
    report = generate_file(model, tokenizer, prompts, tmp_path / "r.jsonl", SETTINGS, progress=False)
    # flexible: a and b; strict (answer line, right): a only; answer lines: a and c
    assert (report.correct, report.strict_correct, report.answered) == (2, 1, 2)
    assert (report.pass_rate, report.strict_pass_rate, report.answered_rate) == (0.5, 0.25, 0.5)
    assert score_file(tmp_path / "r.jsonl") == dataclasses.replace(report, generated=0)  # re-verified from the file


@pytest.mark.slow  # the generation itself is tested in-process above; this is the console entry's wiring
def test_console_entry_generates_with_the_tiny_teacher(tmp_path: Path) -> None:
    out = tmp_path / "gen.jsonl"
    command = [
        sys.executable,
        "-m",
        "kd_lightning.cli.llm_generate",
        "llm/teacher=tiny",
        "prompts.kind=arithmetic",
        "prompts.num_prompts=3",
        "generate.max_new_tokens=4",
        f"generate.out_file={out}",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    subprocess.run(command, check=True, capture_output=True, text=True)
    assert len(read_records(out)) == 3
    assert json.loads(out.with_name("gen.jsonl.meta.json").read_text())["max_new_tokens"] == 4
    # resumes the same file; random weights never answer right
    failed = subprocess.run([*command, "generate.filter_correct=true"], capture_output=True, text=True)
    assert failed.returncode == 2 and "kd-llm-generate: error: generate.filter_correct=true" in failed.stderr
