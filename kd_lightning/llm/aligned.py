"""Examples encoded for a student and a teacher whose tokenizers differ, their completions aligned.

Each example is tokenized twice: with the student's tokenizer (the usual batch keys, see
:mod:`kd_lightning.llm.data`) and with the teacher's (the same keys prefixed ``teacher_``), each with its
own chat template. The two completions are aligned on their character offsets
(:func:`~kd_lightning.llm.cross_tokenizer.align_spans`): ``student_spans`` ``[B, L_s]`` and
``teacher_spans`` ``[B, L_t]`` hold, for every completion token, the index of the aligned span it belongs
to (``-1`` for prompt, padding and tokens outside every span). The two EOS tokens form the last span. A
completion cut by ``max_length`` on either side keeps only the spans both sides kept whole.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from kd_lightning.engine.errors import ConfigError
from kd_lightning.llm.encoding import ExampleEncoder
from kd_lightning.llm.span_alignment import AlignedSpan, align_spans

NO_SPAN = -1


def span_ranges(span_ids: Tensor) -> list[range]:
    """The token ranges of one row's spans, in span order, from its ``[L]`` span ids (:data:`NO_SPAN` elsewhere)."""
    values, counts = torch.unique_consecutive(span_ids, return_counts=True)
    ranges, start = {}, 0
    for value, count in zip(values.tolist(), counts.tolist(), strict=True):
        if value != NO_SPAN:
            ranges[value] = range(start, start + count)
        start += count
    return [ranges[k] for k in sorted(ranges)]


def row_spans(student_span_ids: Tensor, teacher_span_ids: Tensor) -> list[AlignedSpan]:
    """``[(student tokens, teacher tokens), ...]`` of one row, positions in each side's full sequence."""
    student, teacher = span_ranges(student_span_ids), span_ranges(teacher_span_ids)
    if len(student) != len(teacher):
        raise ValueError(f"the row has {len(student)} student spans but {len(teacher)} teacher spans")
    return list(zip(student, teacher, strict=True))


class AlignedEncoder:
    """Encodes prompt / completion examples for both tokenizers and aligns the completions (module docstring).

    Both tokenizers must be fast (``return_offsets_mapping``). ``encode`` returns the student's
    ``prompt`` / ``completion`` ids, the teacher's ``teacher_prompt`` / ``teacher_completion`` ids, the
    aligned ``spans`` (completion-relative ``(student start, stop, teacher start, stop)``) and the prompt
    ``text`` (kept in batches as ``prompt_text``: on-policy samples are re-encoded from text).
    """

    def __init__(
        self,
        student_tokenizer: PreTrainedTokenizerBase,
        teacher_tokenizer: PreTrainedTokenizerBase,
        max_length: int,
        system_prompt: str | None,
    ) -> None:
        sides = (("llm.student.tokenizer", student_tokenizer), ("llm.teacher.tokenizer", teacher_tokenizer))
        for key, tokenizer in sides:
            if not getattr(tokenizer, "is_fast", False):
                raise ConfigError(
                    f"{key} is a slow tokenizer; cross-tokenizer alignment needs character offsets "
                    "(a fast, tokenizers-backed tokenizer)"
                )
        self.student = ExampleEncoder(student_tokenizer, max_length, system_prompt, key="llm.student")
        self.teacher = ExampleEncoder(teacher_tokenizer, max_length, system_prompt, key="llm.teacher")

    @staticmethod
    def _tokens(encoder: ExampleEncoder, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        encoded = encoder.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(encoded["input_ids"]), [tuple(pair) for pair in encoded["offset_mapping"]]

    def encode(self, prompt: str, completion: str | None, eos: bool = True) -> dict[str, Any]:
        """Both encodings of one example and the aligned completion spans; ``eos=False`` for a completion
        that did not finish (a sample cut at ``max_new_tokens``): no EOS on either side."""
        student_prompt, teacher_prompt = self.student.prompt_ids(prompt), self.teacher.prompt_ids(prompt)
        example: dict[str, Any] = {"prompt": student_prompt, "teacher_prompt": teacher_prompt, "text": prompt}
        if completion is None:
            return example
        student_ids, student_offsets = self._tokens(self.student, completion)
        teacher_ids, teacher_offsets = self._tokens(self.teacher, completion)
        try:
            spans = align_spans(student_offsets, teacher_offsets)
        except ValueError as error:
            raise ConfigError(
                f"the student's and the teacher's tokenizers do not cover the same text of the completion "
                f"{completion[:40]!r}... ({error}); cross-tokenizer losses need tokenizers whose offsets "
                "index the original text"
            ) from None
        student = self.student.completion_ids(student_prompt, student_ids, eos)
        teacher = self.teacher.completion_ids(teacher_prompt, teacher_ids, eos)
        pairs = [(s.start, s.stop, t.start, t.stop) for s, t in spans]
        if eos:
            pairs.append((len(student_ids), len(student_ids) + 1, len(teacher_ids), len(teacher_ids) + 1))
        pairs = [pair for pair in pairs if pair[1] <= len(student) and pair[3] <= len(teacher)]
        return {**example, "completion": student, "teacher_completion": teacher, "spans": pairs}

    def collate(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Both sides' batches, the span ids of each side and the prompt texts."""
        batch: dict[str, Any] = {
            **self.student.collate(examples),
            **self.teacher.collate(examples, prefix="teacher_"),
            "prompt_text": [example["text"] for example in examples],
        }
        if "completion" not in examples[0]:
            return batch
        student_spans = torch.full_like(batch["input_ids"], NO_SPAN)
        teacher_spans = torch.full_like(batch["teacher_input_ids"], NO_SPAN)
        for row, example in enumerate(examples):
            student_offset, teacher_offset = len(example["prompt"]), len(example["teacher_prompt"])
            for k, (s_start, s_stop, t_start, t_stop) in enumerate(example["spans"]):
                student_spans[row, student_offset + s_start : student_offset + s_stop] = k
                teacher_spans[row, teacher_offset + t_start : teacher_offset + t_stop] = k
        return {**batch, "student_spans": student_spans, "teacher_spans": teacher_spans}
