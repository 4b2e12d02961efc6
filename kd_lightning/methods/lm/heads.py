"""Checks of what the chunked token loss reads: a causal LM's logits must be ``lm_head(last hidden state)``
(it computes logits from hidden states chunk by chunk), and a logit cache must match the loss."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from kd_lightning.engine.errors import ConfigError
from kd_lightning.llm.logit_cache import LogitCache
from kd_lightning.llm.token_loss import final_hidden_states


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


def check_cache(cache: LogitCache, loss: Any, student: nn.Module) -> None:
    """The cache must hold the teacher at the loss's temperature over the loss's vocabulary."""
    if cache.temperature != loss.temperature:
        raise ConfigError(
            f"the logit cache holds teacher log-probs at T={cache.temperature} but the loss compares at "
            f"T={loss.temperature}; rebuild the cache at the loss temperature"
        )
    vocab = loss.shared_vocab(student.get_output_embeddings().weight.shape[0], None)
    if cache.vocab_size != vocab:
        raise ConfigError(
            f"the logit cache covers {cache.vocab_size} tokens but the loss compares {vocab}; "
            "set llm.loss.vocab_size to the tokenizer size and rebuild the cache"
        )
