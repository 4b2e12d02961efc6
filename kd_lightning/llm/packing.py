"""Sequence packing: several prompt / completion examples per row, none attending to another.

With ``llm.data.packing=true`` a batch's examples are placed greedily, first fit, into rows of at most
``pack_length`` tokens (each example whole, in batch order), instead of one example per padded row. A
packed batch has the usual keys (:mod:`kd_lightning.llm.data`) plus ``position_ids`` ``[R, L]``: each
example's positions restart at 0, and so do the padding's at the end of a row (a sequence of its own).
:func:`~kd_lightning.llm.token_loss.final_hidden_states` hands them to the decoder without a 2D mask, and
Hugging Face's packed-sequence path (a new sequence wherever positions do not step by 1) keeps attention
within each example (sdpa, eager; LM methods check each model once on its first packed batch:
:func:`~kd_lightning.methods.lm.heads.check_packing`). Every example starts with its prompt (labels
``-100``), so no next-token target crosses from one example into the next: per-example losses and the
gradients are those of the padded batch. Valid tokens come row-major (first fit may place a later
example in an earlier row); the logit cache keys each packed example by its content
(:func:`~kd_lightning.llm.logit_cache.example_keys`) and returns its rows in that same order. The prompt
keys (``prompt_input_ids``, for generation) stay one row per example.

Cross-tokenizer batches (:class:`~kd_lightning.llm.aligned.AlignedEncoder`) pack both tokenisations into
the same rows (an example goes where it fits on both sides), and number the aligned spans of a row on
from the previous example's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from kd_lightning.llm.tokens import IGNORE_INDEX


def first_fit(sizes: Sequence[Sequence[int]], capacity: int) -> list[list[int]]:
    """Example indices per row: each example, in order, joins the first row where each of its sizes (one per
    tokenisation) still fits within ``capacity``, else opens a new row."""
    rows: list[list[int]] = []
    filled: list[list[int]] = []
    for index, size in enumerate(sizes):
        for row, used in enumerate(filled):
            if all(u + s <= capacity for u, s in zip(used, size, strict=True)):
                rows[row].append(index)
                filled[row] = [u + s for u, s in zip(used, size, strict=True)]
                break
        else:
            rows.append([index])
            filled.append(list(size))
    return rows


def example_length(example: Mapping[str, Any], prefix: str = "") -> int:
    """Tokens of one encoded example (prompt + completion) of the ``prefix`` tokenisation."""
    return len(example[f"{prefix}prompt"]) + len(example[f"{prefix}completion"])


def pack_side(
    examples: Sequence[Mapping[str, Any]], rows: Sequence[Sequence[int]], pad: int, prefix: str = ""
) -> dict[str, Tensor]:
    """``{prefix}input_ids``, ``attention_mask``, ``labels`` and ``position_ids`` ``[R, L]`` of the examples
    placed in ``rows`` (example indices), each example's positions from 0, padding at the end of rows."""
    width = max(sum(example_length(examples[i], prefix) for i in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    position_ids = torch.zeros_like(input_ids)
    for r, row in enumerate(rows):
        start = 0
        for index in row:
            prompt, completion = examples[index][f"{prefix}prompt"], examples[index][f"{prefix}completion"]
            end = start + len(prompt) + len(completion)
            input_ids[r, start:end] = torch.as_tensor(prompt + completion)
            attention_mask[r, start:end] = 1
            labels[r, start + len(prompt) : end] = torch.as_tensor(completion)
            position_ids[r, start:end] = torch.arange(end - start)
            start = end
        position_ids[r, start:] = torch.arange(width - start)
    return {
        f"{prefix}input_ids": input_ids,
        f"{prefix}attention_mask": attention_mask,
        f"{prefix}labels": labels,
        f"{prefix}position_ids": position_ids,
    }


def pack_spans(
    examples: Sequence[Mapping[str, Any]], rows: Sequence[Sequence[int]], batch: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """``student_spans`` / ``teacher_spans`` of packed rows: each example's aligned spans at its offsets on
    both sides, numbered on from the previous example's in the row (``-1`` elsewhere)."""
    student = torch.full_like(batch["input_ids"], -1)
    teacher = torch.full_like(batch["teacher_input_ids"], -1)
    for r, row in enumerate(rows):
        s_offset = t_offset = first = 0
        for index in row:
            example = examples[index]
            s_base, t_base = s_offset + len(example["prompt"]), t_offset + len(example["teacher_prompt"])
            for k, (s_start, s_stop, t_start, t_stop) in enumerate(example["spans"]):
                student[r, s_base + s_start : s_base + s_stop] = first + k
                teacher[r, t_base + t_start : t_base + t_stop] = first + k
            first += len(example["spans"])
            s_offset += example_length(example)
            t_offset += example_length(example, "teacher_")
    return {"student_spans": student, "teacher_spans": teacher}


def pack_batch(
    padded: Mapping[str, Any], examples: Sequence[Mapping[str, Any]], pad_ids: Mapping[str, int], capacity: int
) -> dict[str, Any]:
    """The packed form of a padded batch of ``examples`` (the encoder's collate output, ``padded``): its prompt
    keys kept per example, its sequence keys (one tokenisation per ``pad_ids`` prefix -> pad id) packed
    into rows of at most ``capacity`` tokens, aligned spans renumbered."""
    sizes = [[example_length(example, prefix) for prefix in pad_ids] for example in examples]
    rows = first_fit(sizes, capacity)
    batch = dict(padded)
    for prefix, pad in pad_ids.items():
        batch.update(pack_side(examples, rows, pad, prefix))
    if "student_spans" in padded:
        batch.update(pack_spans(examples, rows, batch))
    return batch


def example_ranges(position_ids: Tensor, attention_mask: Tensor) -> list[list[tuple[int, int]]]:
    """Per row, the ``(start, stop)`` token ranges of its examples: attended runs whose positions restart at 0."""
    spans = []
    for positions, mask in zip(position_ids.cpu().tolist(), attention_mask.cpu().tolist(), strict=True):
        row, start = [], None
        for t, (position, attended) in enumerate(zip(positions, mask, strict=True)):
            if start is not None and (not attended or position == 0):
                row.append((start, t))
                start = None
            if attended and start is None:
                start = t
        if start is not None:
            row.append((start, len(positions)))
        spans.append(row)
    return spans
