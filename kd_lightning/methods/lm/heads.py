"""Checks of what the chunked token loss reads: a causal LM's logits must be ``lm_head(last hidden state)``
(it computes logits from hidden states chunk by chunk), and a logit cache must match the loss (and is read at
its temperature)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from kd_lightning.engine.errors import ConfigError
from kd_lightning.llm.logit_cache import LogitCache
from kd_lightning.llm.tokens import final_hidden_states


@torch.no_grad()
def check_head(model: nn.Module, key: str, input_ids: Tensor, attention_mask: Tensor) -> None:
    """Fail unless ``model``'s logits are ``lm_head(last hidden state)`` (logit soft-capping or scaling
    breaks it). Runs the first attended tokens of one row, in eval mode."""
    tokens = input_ids[0][attention_mask[0].bool()][:32].unsqueeze(0)
    mask = torch.ones_like(tokens)
    was_training = model.training
    model.eval()
    logits = model(input_ids=tokens, attention_mask=mask, use_cache=False).logits.float()
    recomputed = model.get_output_embeddings()(final_hidden_states(model, tokens, mask)).float()
    model.train(was_training)
    if not torch.allclose(recomputed, logits, rtol=1e-3, atol=1e-3):
        raise ConfigError(
            f"{key}: the model's logits are not lm_head(last hidden state) (logit scaling or soft-capping?); "
            "the chunked token loss cannot distil it"
        )


@torch.no_grad()
def check_packing(model: nn.Module, key: str, input_ids: Tensor, attention_mask: Tensor) -> None:
    """Fail unless ``model`` keeps attention within packed examples (:mod:`kd_lightning.llm.packing`): the
    first attended tokens of one row, after another sequence in the same row, must give the hidden states
    they give alone (an attention implementation that ignores position-id packing attends across)."""
    tokens = input_ids[0][attention_mask[0].bool()][:16].unsqueeze(0)
    row = torch.cat([tokens.flip(1), tokens], dim=1)
    positions = torch.arange(tokens.shape[1], device=tokens.device).repeat(1, 2)
    was_training = model.training
    model.eval()
    alone = final_hidden_states(model, tokens, torch.ones_like(tokens)).float()
    packed = final_hidden_states(model, row, torch.ones_like(row), positions)[:, tokens.shape[1] :].float()
    model.train(was_training)
    if not torch.allclose(packed, alone, rtol=1e-3, atol=1e-3 * float(alone.abs().max().clamp(min=1.0))):
        raise ConfigError(
            f"llm.data.packing=true: {key} attends across the examples of a packed row (its attention "
            f"implementation, {getattr(model.config, '_attn_implementation', '?')}, ignores position-id packing); "
            "set llm.data.packing=false"
        )


def check_cache(cache: LogitCache, loss: Any, student: nn.Module) -> None:
    """The cache must serve rows at the loss's temperature (a format-3 cache is stored at T = 1 and re-tempered on
    each read; one that cannot be, a :class:`ConfigError`) and cover the loss's vocabulary."""
    cache.check_temperature(loss.temperature)
    vocab = loss.shared_vocab(student.get_output_embeddings().weight.shape[0], None)
    if cache.vocab_size != vocab:
        raise ConfigError(
            f"the logit cache covers {cache.vocab_size} tokens but the loss compares {vocab}; "
            "set llm.loss.vocab_size to the tokenizer size and rebuild the cache"
        )
