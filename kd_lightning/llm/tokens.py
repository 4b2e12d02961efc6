"""The token-level vocabulary of the LM half: which positions are valid, a causal LM's final hidden states and
``lm_head``, top-k teacher rows and the loss's output.

Shift convention (the one Hugging Face causal LMs use): ``labels`` is ``[B, T]`` and aligned with
``input_ids``; the model's output at position ``t`` predicts ``labels[:, t + 1]``. So position ``t``
is *valid* when ``labels[:, t + 1] != -100`` (prompt and padding tokens carry ``-100``); the last
position predicts nothing. :func:`next_token_targets` defines this once; the logit cache stores its
rows in the same order (row-major over ``[B, T]``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.engine.errors import ConfigError
from kd_lightning.losses.precision import at_least_fp32, autocast_off

#: Label of tokens that are not predicted (prompt, padding, positions after the end of a sample).
IGNORE_INDEX = -100


class SparseTeacher(NamedTuple):
    """A top-k teacher for each valid token (in :func:`next_token_targets` order): the ``k`` most likely
    token ids ``[N, k]``, their log-probabilities ``[N, k]`` and the log of the remaining mass ``[N]``,
    all at the loss's temperature."""

    ids: Tensor
    log_probs: Tensor
    tail: Tensor


class TokenLossOutput(NamedTuple):
    """Sums over valid tokens, so callers normalise by the right count (e.g. across gradient accumulation).

    ``total``: :math:`\\sum_i (1 - \\alpha)\\,\\mathrm{CE}_i + \\alpha\\,D_i` (carries the graph);
    ``count``: the number of valid tokens; ``parts``: detached sums ``ce``, ``distill`` and, when asked
    for, ``kl_to_teacher``. The per-token mean of one batch is ``total / count``; under gradient
    accumulation, back-propagate the micro-batches' ``total`` and divide the gradients by the sum of their
    ``count`` (what :class:`~kd_lightning.methods.llm.LLMDistillationModule` does), since a mean of
    micro-batch means weighs tokens unequally.
    """

    total: Tensor
    count: Tensor
    parts: dict[str, Tensor]


def next_token_targets(labels: Tensor, ignore_index: int = IGNORE_INDEX) -> tuple[Tensor, Tensor]:
    """``(targets, positions)``: ``targets[b, t] = labels[b, t + 1]`` (``ignore_index`` at ``t = T - 1``)
    and the flat indices into ``[B * T]`` of the valid positions, row-major."""
    targets = F.pad(labels[:, 1:], (0, 1), value=ignore_index)
    positions = (targets.reshape(-1) != ignore_index).nonzero().squeeze(1)
    return targets, positions


def final_hidden_states(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor | None = None
) -> Tensor:
    """``[B, T, H]``: a Hugging Face causal LM's last hidden states, the input of its ``lm_head``. Positions
    count attended tokens only, so left- and right-padded rows give the same values. Packed rows
    (:mod:`kd_lightning.llm.packing`) give ``position_ids`` restarting at 0 for each example: the decoder then
    gets no 2D mask, and Hugging Face's packed-sequence path (``find_packed_sequence_indices``: a new
    sequence wherever positions do not step by 1) lets no token attend across examples."""
    if position_ids is not None:
        out = model.get_decoder()(input_ids=input_ids, attention_mask=None, position_ids=position_ids, use_cache=False)
        return out.last_hidden_state
    position_ids = (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)
    decoder = model.get_decoder()
    out = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    return out.last_hidden_state


def sequence_inputs(batch: Mapping[str, Tensor], prefix: str = "") -> tuple[Tensor, ...]:
    """The :func:`final_hidden_states` arguments of a batch's ``{prefix}`` tokenisation: ``(input_ids,
    attention_mask)``, plus ``position_ids`` for packed rows."""
    inputs = (batch[f"{prefix}input_ids"], batch[f"{prefix}attention_mask"])
    packed = batch.get(f"{prefix}position_ids")
    return inputs if packed is None else (*inputs, packed)


def linear_head(head: nn.Module, key: str) -> tuple[Tensor, Tensor | None]:
    """``(weight [V, H], bias)`` of an output layer; the chunked loss needs a plain ``nn.Linear``."""
    if not isinstance(head, nn.Linear):
        raise ConfigError(
            f"{key}: the output layer is a {type(head).__name__}, not nn.Linear; the chunked token loss needs "
            "logits = lm_head(hidden) (leave lm_head out of lora.target_modules)"
        )
    return head.weight, head.bias


def bucket_log_probs(log_probs: Tensor, ids: Tensor) -> Tensor:
    """Collapse full log-probabilities ``[N, V]`` onto ``k + 1`` buckets: the ``ids`` ``[N, k]`` and the rest."""
    top = log_probs.gather(1, ids)
    tail = torch.logsumexp(log_probs.scatter(1, ids, float("-inf")), dim=-1, keepdim=True)
    return torch.cat([top, tail], dim=1)


def head_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None, vocab: int) -> Tensor:
    """``hidden @ weight.T + bias`` in the weight's dtype (autocast off), first ``vocab`` columns, >= float32."""
    if vocab < weight.shape[0]:
        weight, bias = weight[:vocab], None if bias is None else bias[:vocab]
    with autocast_off(hidden):
        return at_least_fp32(F.linear(hidden.to(weight.dtype), weight, bias))
