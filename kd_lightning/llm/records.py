"""Records of prompt / completion JSONL files: reading them strictly, the verifier's counts over them, and the
filters that read them back for training (rejection sampling, a length budget)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kd_lightning.engine.errors import ConfigError
from kd_lightning.llm.prompts import has_answer_line, is_correct

#: What to relax when rejection sampling keeps nothing.
RELAX_ADVICE = "raise generate.num_samples (with generate.do_sample=true), raise generate.max_new_tokens, or set "


def read_records(path: Path, key: str | None = None, repair: bool = False) -> list[dict[str, Any]]:
    """The JSON-object records of a JSONL file (blank lines skipped); the file is only read.

    A line that is not a JSON object is an error naming ``key`` (the config key of the file) and the line;
    except, with ``repair`` (this library's own output being resumed), a last line cut short by an
    interrupted run, which is dropped from the file."""
    if not path.exists():
        return []
    name = f"{key}={path}" if key else str(path)
    try:
        lines = path.read_bytes().decode("utf-8").splitlines(keepends=True)
    except UnicodeDecodeError as error:
        raise ConfigError(f"{name} is not UTF-8 text (byte {error.start}); save it as UTF-8 JSONL") from None
    records = []
    for number, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if repair and number == len(lines) - 1 and not line.endswith("\n"):
                path.write_text("".join(lines[:-1]))
                break
            raise ConfigError(f"{name}: line {number + 1} is not JSON; fix or delete that line") from None
        if not isinstance(record, dict):
            raise ConfigError(f'{name}: line {number + 1} is not a JSON object ({{"prompt": ..., ...}})')
        records.append(record)
    return records


@dataclass
class GenerationReport:
    """Counts of one :func:`generate_file` call (whole file, resumed records included)."""

    path: str
    prompts: int
    completions: int
    generated: int
    checkable: int
    correct: int
    answered: int
    strict_correct: int

    @property
    def pass_rate(self) -> float | None:
        """Fraction of completions of answerable prompts whose final answer is right (the last number counts
        when there is no answer line: lm-eval-harness's "flexible-extract")."""
        return self.correct / self.checkable if self.checkable else None

    @property
    def strict_pass_rate(self) -> float | None:
        """Fraction of completions of answerable prompts whose answer line is right ("strict-match")."""
        return self.strict_correct / self.checkable if self.checkable else None

    @property
    def answered_rate(self) -> float | None:
        """Fraction of completions of answerable prompts with the answer line ("The answer is N.")."""
        return self.answered / self.checkable if self.checkable else None


def score_file(path: Path, ids: set[str] | None = None, generated: int = 0) -> GenerationReport:
    """The verifier's counts over the records of ``path`` (those of prompts ``ids``, default all), re-verified
    from each completion and answer, so records written before a verifier change are scored alike."""
    records = [record for record in read_records(path) if ids is None or record["id"] in ids]
    checkable = [record for record in records if record.get("answer") is not None]
    return GenerationReport(
        path=str(path),
        prompts=len(ids) if ids is not None else len({record["id"] for record in records}),
        completions=len(records),
        generated=generated,
        checkable=len(checkable),
        correct=sum(is_correct(record["completion"], record["answer"]) for record in checkable),
        answered=sum(has_answer_line(record["completion"]) for record in checkable),
        strict_correct=sum(is_correct(record["completion"], record["answer"], strict=True) for record in checkable),
    )


def keep_correct(records: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """Rejection sampling: drop completions whose final answer is wrong (records without one stay)."""
    kept = [record for record in records if record.get("correct") is not False]
    if not kept:
        raise ConfigError(
            f"{key}=true kept none of {len(records)} completions (no final answer was right): {RELAX_ADVICE}{key}=false"
        )
    return kept


def keep_shortest(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A length budget ("long-to-short"): per prompt, only its shortest completion (in characters; the first
    of equal ones). Apply after :func:`keep_correct` to keep the shortest *verified* trace."""
    shortest: dict[str, dict[str, Any]] = {}
    for record in records:
        key = record.get("id", record["prompt"])
        if key not in shortest or len(record["completion"]) < len(shortest[key]["completion"]):
            shortest[key] = record
    return list(shortest.values())
