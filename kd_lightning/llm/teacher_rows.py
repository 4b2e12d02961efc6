"""What a teacher's top-k rows are and how examples are keyed, for the logit cache and a served teacher.

Rows follow :func:`~kd_lightning.llm.token_loss.next_token_targets` (one per valid token, loss order); an example
(a row, or one example of a packed row, :mod:`~kd_lightning.llm.packing`) is keyed by its content.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.llm.cache_codec import TAIL_EXPONENTS
from kd_lightning.llm.packing import example_ranges
from kd_lightning.llm.tokens import (
    IGNORE_INDEX,
    SparseTeacher,
    bucket_log_probs,
    final_hidden_states,
    linear_head,
    next_token_targets,
    sequence_inputs,
)

Batch = Mapping[str, Tensor]


class RemoteScorer(Protocol):
    """A teacher that is not a module: named by ``identity``, scoring batches into top-k rows."""

    identity: str

    def top_k_batch(self, batch: Batch, top_k: int, temperature: float, vocab_size: int) -> SparseTeacher: ...


def example_keys(batch: Batch) -> list[tuple[str, int]]:
    """``(key, valid tokens)`` per example (a row, or each example of a packed row: ``position_ids``, see
    :mod:`~kd_lightning.llm.packing`): the key hashes the example's attended tokens and their labels, so it
    does not depend on padding side, packing, batch composition or order."""
    mask = batch["attention_mask"].bool().cpu()
    ids, labels = batch["input_ids"].cpu(), batch["labels"].cpu()
    if "position_ids" in batch:
        examples = [
            (ids[row, start:stop], labels[row, start:stop])
            for row, ranges in enumerate(example_ranges(batch["position_ids"], mask))
            for start, stop in ranges
        ]
    else:
        examples = [(ids[row][mask[row]], labels[row][mask[row]]) for row in range(ids.shape[0])]
    keys = []
    for tokens, targets in examples:
        digest = hashlib.blake2b(tokens.numpy().astype(np.int64).tobytes(), digest_size=16)
        digest.update(targets.numpy().astype(np.int64).tobytes())
        keys.append((digest.hexdigest(), int((targets[1:] != IGNORE_INDEX).sum())))
    return keys


@torch.no_grad()
def teacher_log_probs(
    teacher: nn.Module, batch: Batch, vocab_size: int, temperature: float = 1.0, chunk_size: int = 512
) -> Iterator[Tensor]:
    """``log_softmax(logits[:vocab_size] / T)`` of every valid token (loss order), ``chunk_size`` rows at a time."""
    hidden = final_hidden_states(teacher, *sequence_inputs(batch))
    _, positions = next_token_targets(batch["labels"])
    hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)
    weight, bias = linear_head(teacher.get_output_embeddings(), "llm.teacher.model")
    if vocab_size < weight.shape[0]:
        weight, bias = weight[:vocab_size], None if bias is None else bias[:vocab_size]
    for chunk in hidden.split(chunk_size):
        yield F.log_softmax(F.linear(chunk.to(weight.dtype), weight, bias).float() / temperature, dim=-1)


def teacher_top_k(
    teacher: nn.Module, batch: Batch, top_k: int, temperature: float, vocab_size: int, chunk_size: int = 512
) -> SparseTeacher:
    """The teacher's top-k log-probabilities of ``softmax(logits[:vocab_size] / T)`` and tail per valid token."""
    parts = []
    for log_probs in teacher_log_probs(teacher, batch, vocab_size, temperature, chunk_size):
        top, ids = log_probs.topk(top_k, dim=-1)
        parts.append((ids, top, bucket_log_probs(log_probs, ids)[:, -1]))
    return SparseTeacher(*stack_columns(parts, top_k, 3))


def stack_columns(parts: list[tuple[Tensor, ...]], top_k: int, columns: int) -> list[Tensor]:
    """Chunks' columns concatenated (ids, log-probs, tail, entropies...), or empty ones when there are none."""
    if parts:
        return [torch.cat(column) for column in zip(*parts, strict=True)]
    empty = torch.zeros((0, top_k))
    return [empty.long(), empty, empty.new_zeros(0), empty.new_zeros((0, len(TAIL_EXPONENTS)))][:columns]
