"""Prompt / completion datamodules for LM distillation.

Examples come from a JSONL file (``kd-llm-generate`` output: teacher completions, or any file with
``prompt`` and ``completion`` fields) or, without a file, from :func:`~kd_lightning.llm.prompts.make_prompts`
with reference completions (``"The answer is N."``, arithmetic only). Prompts are encoded with the
tokenizer's chat template, completions end with the EOS token.

Batches (dicts of ``long`` tensors):

- with completions: ``input_ids``, ``attention_mask`` ``(B, L)`` (prompt + completion + EOS, padded on
  the right), ``labels`` ``(B, L)`` (the completion and its EOS; prompt and padding are -100), and the
  prompts alone, padded on the left for generation: ``prompt_input_ids``, ``prompt_attention_mask`` ``(B, P)``;
- ``prompt_only=True`` (on-policy training, the student writes the completions): only the two prompt keys.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from kd_lightning.engine.errors import ConfigError
from kd_lightning.llm.generation import keep_correct, left_pad, read_records
from kd_lightning.llm.prompts import chat_ids, make_prompts
from kd_lightning.llm.token_loss import IGNORE_INDEX


def reference_completion(answer: int) -> str:
    """The reference completion of an arithmetic problem (the format its prompt asks for)."""
    return f"The answer is {answer}."


def load_examples(
    file: str | None, prompts: Mapping[str, Any] | None, key: str, only_correct: bool, need_completions: bool
) -> list[dict[str, Any]]:
    """``[{"prompt": ..., "completion": ... or None}]`` from ``file`` or, without one, from generated ``prompts``."""
    if file is not None:
        path = Path(file).expanduser()
        if not path.is_file():
            raise ConfigError(f"{key}_file={file} does not exist; write it with kd-llm-generate or fix the path")
        records = read_records(path)
        if not records:
            raise ConfigError(f"{key}_file={file} is empty; (re)generate it with kd-llm-generate")
        if only_correct:
            records = keep_correct(records, f"{key.rsplit('.', 1)[0]}.only_correct")
        return [{"prompt": record["prompt"], "completion": record.get("completion")} for record in records]
    if prompts is None:
        raise ConfigError(f"set {key}_file (a JSONL of prompts and completions) or {key}_prompts")
    examples = []
    for prompt in make_prompts(**prompts):
        if need_completions and prompt.answer is None:
            raise ConfigError(
                f"{key}_prompts.kind={prompts['kind']} has no reference completions; use kind=arithmetic, "
                f"or teacher completions in {key}_file (kd-llm-generate)"
            )
        completion = None if prompt.answer is None else reference_completion(prompt.answer)
        examples.append({"prompt": prompt.text, "completion": completion})
    return examples


class LLMDataModule(L.LightningDataModule):
    """Prompt / completion batches (see the module docstring) for a shared ``tokenizer``.

    - ``train_file`` / ``val_file``: JSONL with ``prompt`` and ``completion`` fields; else
      ``train_prompts`` / ``val_prompts``: :func:`~kd_lightning.llm.prompts.make_prompts` arguments
      (arithmetic problems get reference completions).
    - ``only_correct``: drop file records whose verified final answer is wrong (rejection sampling).
    - ``prompt_only``: training batches hold prompts only (on-policy); validation keeps completions.
    - ``max_length``: prompt + completion tokens; longer completions are cut (their EOS too), a prompt
      that leaves no room for a completion token is an error.
    - ``system_prompt``: ``None`` keeps the chat template's default system turn.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        train_file: str | None = None,
        val_file: str | None = None,
        train_prompts: Mapping[str, Any] | None = None,
        val_prompts: Mapping[str, Any] | None = None,
        only_correct: bool = False,
        prompt_only: bool = False,
        max_length: int = 256,
        batch_size: int = 8,
        val_batch_size: int | None = None,
        system_prompt: str | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if max_length < 2:
            raise ConfigError(f"llm.data.max_length={max_length} must be >= 2")
        if batch_size < 1 or (val_batch_size is not None and val_batch_size < 1):
            raise ConfigError(f"llm.data.batch_size={batch_size} / val_batch_size={val_batch_size} must be >= 1")
        if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
            raise ConfigError("llm.teacher.tokenizer needs pad and eos tokens (set pad_token = eos_token)")
        self.tokenizer = tokenizer
        self.sources = {"train": (train_file, train_prompts), "val": (val_file, val_prompts)}
        self.only_correct = only_correct
        self.prompt_only = prompt_only
        self.max_length = max_length
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.system_prompt = system_prompt
        self.num_workers = num_workers
        self.splits: dict[str, list[dict[str, list[int]]]] = {}

    def encode(self, prompt: str, completion: str | None) -> dict[str, list[int]]:
        """Token ids of one example: ``prompt`` (chat-formatted) and ``completion`` (+ EOS, cut to fit)."""
        prompt_ids = chat_ids(self.tokenizer, prompt, self.system_prompt)
        if len(prompt_ids) >= self.max_length:
            raise ConfigError(
                f"a prompt has {len(prompt_ids)} tokens, no room for a completion within "
                f"llm.data.max_length={self.max_length}; raise llm.data.max_length ({prompt[:40]!r}...)"
            )
        if completion is None:
            return {"prompt": prompt_ids}
        completion_ids = self.tokenizer(completion, add_special_tokens=False)["input_ids"]
        completion_ids = [*completion_ids, self.tokenizer.eos_token_id][: self.max_length - len(prompt_ids)]
        return {"prompt": prompt_ids, "completion": completion_ids}

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        for split, (file, prompts) in self.sources.items():
            with_completions = split == "val" or not self.prompt_only
            examples = load_examples(file, prompts, f"llm.data.{split}", self.only_correct, with_completions)
            if with_completions and any(example["completion"] is None for example in examples):
                raise ConfigError(f"llm.data.{split}_file={file} has records without a completion")
            self.splits[split] = [
                self.encode(example["prompt"], example["completion"] if with_completions else None)
                for example in examples
            ]

    def collate(self, examples: Sequence[dict[str, list[int]]]) -> dict[str, Tensor]:
        """Pad a list of encoded examples into one batch (see the module docstring)."""
        pad = self.tokenizer.pad_token_id
        prompt_ids, prompt_mask = left_pad([example["prompt"] for example in examples], pad)
        batch = {"prompt_input_ids": prompt_ids, "prompt_attention_mask": prompt_mask}
        if "completion" not in examples[0]:
            return batch
        width = max(len(example["prompt"]) + len(example["completion"]) for example in examples)
        input_ids = torch.full((len(examples), width), pad, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        for row, example in enumerate(examples):
            prompt, completion = example["prompt"], example["completion"]
            end = len(prompt) + len(completion)
            input_ids[row, :end] = torch.as_tensor(prompt + completion)
            attention_mask[row, :end] = 1
            labels[row, len(prompt) : end] = torch.as_tensor(completion)
        return {**batch, "input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        self.setup()
        return DataLoader(
            self.splits[split],
            batch_size=batch_size,
            shuffle=shuffle,
            collate_fn=self.collate,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.val_batch_size, shuffle=False)
