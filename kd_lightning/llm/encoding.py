"""One tokenizer's token ids of prompt / completion examples and their padded batches (see
:mod:`kd_lightning.llm.data` for the batch keys)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from kd_lightning.engine.errors import ConfigError
from kd_lightning.llm.generation import left_pad
from kd_lightning.llm.prompts import chat_ids
from kd_lightning.llm.tokens import IGNORE_INDEX


class ExampleEncoder:
    """Token ids of prompt / completion examples for one ``tokenizer``, and their padded batches.

    :meth:`encode` gives ``{"prompt": ids, "completion": ids}`` (the prompt chat-formatted, the completion
    followed by EOS and cut to ``max_length`` in all); :meth:`collate` pads them into the batch keys of
    the module docstring, each prefixed by ``prefix`` (``"teacher_"`` for a teacher's own tokenisation).
    """

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, max_length: int, system_prompt: str | None, key: str = "llm.teacher"
    ) -> None:
        if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
            raise ConfigError(f"{key}.tokenizer needs pad and eos tokens (set pad_token = eos_token)")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.system_prompt = system_prompt

    def prompt_ids(self, prompt: str) -> list[int]:
        """The chat-formatted prompt; an error when it leaves no room for a completion token."""
        ids = chat_ids(self.tokenizer, prompt, self.system_prompt)
        if len(ids) >= self.max_length:
            raise ConfigError(
                f"a prompt has {len(ids)} tokens, no room for a completion within "
                f"llm.data.max_length={self.max_length}; raise llm.data.max_length ({prompt[:40]!r}...)"
            )
        return ids

    def completion_ids(self, prompt_ids: Sequence[int], completion_ids: Sequence[int], eos: bool = True) -> list[int]:
        """``completion_ids`` + EOS (unless ``eos`` is False: an unfinished sample), cut so that the prompt and
        the completion fit in ``max_length``."""
        ending = [self.tokenizer.eos_token_id] if eos else []
        return [*completion_ids, *ending][: self.max_length - len(prompt_ids)]

    def encode(self, prompt: str, completion: str | None, eos: bool = True) -> dict[str, list[int]]:
        """Token ids of one example: ``prompt`` (chat-formatted) and ``completion`` (+ EOS unless ``eos`` is
        False, cut to fit)."""
        prompt_ids = self.prompt_ids(prompt)
        if completion is None:
            return {"prompt": prompt_ids}
        completion_ids = self.tokenizer(completion, add_special_tokens=False)["input_ids"]
        return {"prompt": prompt_ids, "completion": self.completion_ids(prompt_ids, completion_ids, eos)}

    def collate(self, examples: Sequence[Mapping[str, Any]], prefix: str = "") -> dict[str, Tensor]:
        """Pad the examples' ``{prefix}prompt`` / ``{prefix}completion`` ids into one batch of ``{prefix}*`` keys."""
        pad = self.tokenizer.pad_token_id
        prompts = [example[f"{prefix}prompt"] for example in examples]
        prompt_ids, prompt_mask = left_pad(prompts, pad)
        batch = {f"{prefix}prompt_input_ids": prompt_ids, f"{prefix}prompt_attention_mask": prompt_mask}
        if f"{prefix}completion" not in examples[0]:
            return batch
        completions = [example[f"{prefix}completion"] for example in examples]
        width = max(len(prompt) + len(completion) for prompt, completion in zip(prompts, completions, strict=True))
        input_ids = torch.full((len(examples), width), pad, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        for row, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
            end = len(prompt) + len(completion)
            input_ids[row, :end] = torch.as_tensor(prompt + completion)
            attention_mask[row, :end] = 1
            labels[row, len(prompt) : end] = torch.as_tensor(completion)
        return {
            **batch,
            f"{prefix}input_ids": input_ids,
            f"{prefix}attention_mask": attention_mask,
            f"{prefix}labels": labels,
        }
