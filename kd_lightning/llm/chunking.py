"""Per-token sums computed chunk by chunk, each chunk recomputed in the backward pass.

A token loss over ``N`` valid tokens and a vocabulary of ``V`` needs ``[N, V]`` logits; :func:`chunked_sums`
evaluates it ``chunk_size`` rows at a time and, with gradients enabled, under
:func:`torch.utils.checkpoint.checkpoint`, so only one chunk's ``[chunk, V]`` tensors are alive at once and
backward recomputes them instead of keeping them (:class:`~kd_lightning.llm.token_loss.TokenDistillationLoss`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint


def chunked_sums(
    sums_of: Callable[..., Tensor],
    columns: list[Tensor | None],
    arguments: Callable[..., tuple],
    graph: tuple[Tensor, Tensor],
    width: int,
    chunk_size: int | None,
) -> Tensor:
    """``sum_c sums_of(*arguments(*chunk_c))`` over chunks of ``chunk_size`` rows of the per-token ``columns``
    (None columns stay None in every chunk; ``chunk_size`` None: one chunk of all rows, not recomputed), each
    chunk recomputed in the backward pass while training (activation checkpointing: one chunk's logits in
    memory at a time). No row: ``width`` zeros that still reach the graph of ``graph`` (the student's hidden
    states and head weight), so backward runs as on any batch."""
    size = chunk_size or max(columns[0].shape[0], 1)
    split = [t.split(size) if t is not None else None for t in columns]
    chunked = torch.is_grad_enabled() and chunk_size is not None
    chunk_sums = []
    for i in range(len(split[0])):
        args = arguments(*(None if parts is None else parts[i] for parts in split))
        if chunked:
            chunk_sums.append(checkpoint(sums_of, *args, use_reentrant=False, preserve_rng_state=False))
        else:
            chunk_sums.append(sums_of(*args))
    if chunk_sums:
        return torch.stack(chunk_sums).sum(dim=0)
    return (graph[0].sum() + graph[1].sum()).float().mul(0).expand(width)
