"""Prompt / completion datamodules for LM distillation.

Examples come from a JSONL file (``kd-llm-generate`` output: teacher completions, or any file with
``prompt`` and ``completion`` fields) or, without a file, from :func:`~kd_lightning.llm.prompts.make_prompts`
with reference completions (``"The answer is N."``, arithmetic only). Prompts are encoded with the
tokenizer's chat template, completions end with the EOS token.

Batches (dicts of ``long`` tensors):

- with completions: ``input_ids``, ``attention_mask`` ``(B, L)`` (prompt + completion + EOS, padded on
  the right), ``labels`` ``(B, L)`` (the completion and its EOS; prompt and padding are -100), and the
  prompts alone, padded on the left for generation: ``prompt_input_ids``, ``prompt_attention_mask`` ``(B, P)``;
- ``prompt_only=True`` (on-policy training, the student writes the completions): only the two prompt keys;
- ``packing=True``: the completion keys hold several examples per row and ``position_ids`` restarting at 0
  for each (:mod:`kd_lightning.llm.packing`); the prompt keys stay one row per example.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from kd_lightning.engine.errors import ConfigError
from kd_lightning.llm.aligned import AlignedEncoder
from kd_lightning.llm.encoding import ExampleEncoder
from kd_lightning.llm.packing import pack_batch
from kd_lightning.llm.prompts import make_prompts
from kd_lightning.llm.protocol import SOURCE_KEY, TokenSource
from kd_lightning.llm.records import keep_correct, keep_shortest, read_records
from kd_lightning.llm.served import ReadAheadLoader
from kd_lightning.llm.teacher_combinations import RoutedEncoder, RowRouting


def reference_completion(answer: int) -> str:
    """The reference completion of an arithmetic problem (the format its prompt asks for)."""
    return f"The answer is {answer}."


def load_examples(
    file: str | None,
    prompts: Mapping[str, Any] | None,
    key: str,
    only_correct: bool,
    need_completions: bool,
    shortest: bool = False,
) -> list[dict[str, Any]]:
    """``[{"prompt": ..., "completion": ... or None, ...}]`` from ``file`` (every field of its records kept, e.g.
    ``kind`` or a ``teacher`` column) or, without one, from generated ``prompts`` (with their ``kind``)."""
    if file is not None:
        path = Path(file).expanduser()
        if not path.is_file():
            raise ConfigError(f"{key}_file={file} does not exist; write it with kd-llm-generate or fix the path")
        records = read_records(path, f"{key}_file")
        if not records:
            raise ConfigError(f"{key}_file={file} is empty; (re)generate it with kd-llm-generate")
        for number, record in enumerate(records, 1):
            if not isinstance(record.get("prompt"), str) or not isinstance(record.get("completion", ""), str | None):
                raise ConfigError(
                    f"{key}_file={file}: record {number} needs a string 'prompt' (and a string 'completion'); "
                    "fix the file or regenerate it with kd-llm-generate"
                )
        if only_correct:
            records = keep_correct(records, f"{key.rsplit('.', 1)[0]}.only_correct")
        if shortest:
            records = keep_shortest(records)
        return [{**record, "completion": record.get("completion")} for record in records]
    if prompts is None:
        raise ConfigError(f"set {key}_file (a JSONL of prompts and completions) or {key}_prompts")
    examples = []
    for prompt in make_prompts(**prompts):
        if need_completions and prompt.answer is None:
            raise ConfigError(
                f"{key}_prompts.kind={prompts['kind']} has no reference completions; use kind=arithmetic, "
                f"or teacher completions in {key}_file (kd-llm-generate)"
            )
        completion = prompt.solution or (None if prompt.answer is None else reference_completion(prompt.answer))
        examples.append({"prompt": prompt.text, "completion": completion, "kind": prompt.kind})
    return examples


def make_encoder(
    tokenizer: PreTrainedTokenizerBase,
    teacher_tokenizer: PreTrainedTokenizerBase | Sequence[PreTrainedTokenizerBase] | None,
    max_length: int,
    system_prompt: str | None,
    routing: RowRouting | None = None,
) -> Any:
    """The encoder of :class:`LLMDataModule`'s examples: one tokenisation, both aligned, or routed per row."""
    if routing is not None:
        teachers = teacher_tokenizer if teacher_tokenizer is not None else [None] * len(routing.names)
        if isinstance(teachers, PreTrainedTokenizerBase) or len(teachers) != len(routing.names):
            raise ConfigError(f"routing over {routing.names} needs one teacher tokenizer per teacher (or none)")
        encoders = [make_encoder(tokenizer, teacher, max_length, system_prompt) for teacher in teachers]
        return RoutedEncoder(encoders, routing)
    if teacher_tokenizer is None:
        return ExampleEncoder(tokenizer, max_length, system_prompt)
    return AlignedEncoder(tokenizer, teacher_tokenizer, max_length, system_prompt)


class LLMDataModule(L.LightningDataModule):
    """Prompt / completion batches (see the module docstring) for ``tokenizer`` (the student's).

    - ``train_file`` / ``val_file``: JSONL with ``prompt`` and ``completion`` fields; else
      ``train_prompts`` / ``val_prompts``: :func:`~kd_lightning.llm.prompts.make_prompts` arguments
      (arithmetic problems get reference completions).
    - ``only_correct``: drop file records whose verified final answer is wrong (rejection sampling).
    - ``shortest``: a length budget ("long-to-short"): keep each prompt's shortest (remaining) completion.
    - ``prompt_only``: training batches hold prompts only (on-policy); validation keeps completions.
    - ``max_length``: prompt + completion tokens; longer completions are cut (their EOS too), a prompt
      that leaves no room for a completion token is an error.
    - ``system_prompt``: ``None`` keeps the chat template's default system turn.
    - ``teacher_tokenizer``: a teacher with its own tokenizer (cross-tokenizer distillation): every example
      is also encoded for the teacher, ``teacher_*`` keys, with the two completions' token spans aligned
      (:class:`~kd_lightning.llm.aligned.AlignedEncoder`).
    - ``source``: where the completions came from, ``ground_truth`` (references) or ``teacher`` (teacher-written);
      batches carry it as ``token_source`` (:mod:`kd_lightning.llm.protocol`).
    - ``routing``: several teachers, one per row (:class:`~kd_lightning.llm.teacher_combinations.RowRouting`):
      batches get ``teacher_index``; with ``teacher_tokenizer`` one tokenizer per teacher, in order, each
      row aligned for its own teacher.
    - ``packing``: the examples of a batch (still ``batch_size`` of them) share rows of at most ``pack_length``
      tokens (null: ``max_length``), first fit, attending within their own example only
      (:mod:`kd_lightning.llm.packing`): less padding, the same per-example losses and gradients. Batches
      with completions only: not with ``prompt_only`` or ``routing``; student responses (DistiLLM-2's
      ``sampled_*`` keys, a loss of their own) stay one per row.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        train_file: str | None = None,
        val_file: str | None = None,
        train_prompts: Mapping[str, Any] | None = None,
        val_prompts: Mapping[str, Any] | None = None,
        only_correct: bool = False,
        shortest: bool = False,
        prompt_only: bool = False,
        max_length: int = 256,
        batch_size: int = 8,
        val_batch_size: int | None = None,
        system_prompt: str | None = None,
        num_workers: int = 0,
        teacher_tokenizer: PreTrainedTokenizerBase | Sequence[PreTrainedTokenizerBase] | None = None,
        routing: RowRouting | None = None,
        source: str = TokenSource.GROUND_TRUTH.value,
        packing: bool = False,
        pack_length: int | None = None,
    ) -> None:
        super().__init__()
        if packing and (prompt_only or routing is not None):
            why = "llm.data.prompt_only=true batches hold prompts only" if prompt_only else "routing is per row"
            raise ConfigError(f"llm.data.packing=true packs dataset completions but {why}: set llm.data.packing=false")
        if pack_length is not None and (type(pack_length) is not int or pack_length < max_length):
            raise ConfigError(f"llm.data.pack_length={pack_length} must be >= llm.data.max_length={max_length} or null")
        self.pack_length = (pack_length or max_length) if packing else None
        if source not in (TokenSource.GROUND_TRUTH.value, TokenSource.TEACHER.value):
            raise ConfigError(f"llm.data.source={source!r}: the completions are 'ground_truth' or 'teacher' text")
        self.source = source
        if max_length < 2:
            raise ConfigError(f"llm.data.max_length={max_length} must be >= 2")
        if batch_size < 1 or (val_batch_size is not None and val_batch_size < 1):
            raise ConfigError(f"llm.data.batch_size={batch_size} / val_batch_size={val_batch_size} must be >= 1")
        self.tokenizer = tokenizer
        self.encoder = make_encoder(tokenizer, teacher_tokenizer, max_length, system_prompt, routing)
        self.sources = {"train": (train_file, train_prompts), "val": (val_file, val_prompts)}
        self.only_correct = only_correct
        self.shortest = shortest
        self.prompt_only = prompt_only
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.splits: dict[str, list[dict[str, Any]]] = {}
        self.prompts: dict[str, list[str]] = {}
        self.read_ahead: tuple[Callable[[Mapping[str, Any]], object], int] | None = None

    def read_ahead_with(self, hook: Callable[[Mapping[str, Any]], object], depth: int) -> None:
        """Hand every batch to ``hook`` when a loader reads it, ``depth`` batches before yielding it (a served
        teacher starts scoring it: :class:`~kd_lightning.llm.served.ReadAheadLoader`)."""
        self.read_ahead = (hook, depth)

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        for split, (file, prompts) in self.sources.items():
            with_completions = split == "val" or not self.prompt_only
            examples = load_examples(
                file,
                prompts,
                f"llm.data.{split}",
                self.only_correct,
                with_completions,
                self.shortest and split == "train",
            )
            self.prompts[split] = [example["prompt"] for example in examples]
            if with_completions and any(example["completion"] is None for example in examples):
                raise ConfigError(f"llm.data.{split}_file={file} has records without a completion")
            route = getattr(self.encoder, "route", None)
            self.splits[split] = [
                self.encoder.encode(
                    example["prompt"],
                    example["completion"] if with_completions else None,
                    **({"teacher": route(example)} if route else {}),
                )
                for example in examples
            ]

    def add_student_responses(self, responses: Mapping[str, str], prefix: str = "sampled_") -> None:
        """Give every training example a second completion, ``responses[prompt]`` (the student's own, for
        DistiLLM-2), batched under ``prefix``-ed keys beside the dataset's completion."""
        if not isinstance(self.encoder, ExampleEncoder):
            raise ConfigError("student responses (llm/loss=distillm2) need one tokenizer for teacher and student")
        self.setup()
        for prompt, example in zip(self.prompts["train"], self.splits["train"], strict=True):
            if prompt not in responses:
                raise ConfigError(f"no student response for the training prompt {prompt[:40]!r}...")
            encoded = self.encoder.encode(prompt, responses[prompt])
            example.update({f"{prefix}{key}": value for key, value in encoded.items()})

    def collate(self, examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Pad a list of encoded examples into one batch (see the module docstring)."""
        batch = self.encoder.collate(examples)
        if self.pack_length is not None and "completion" in examples[0]:
            batch = pack_batch(batch, examples, self.pad_ids(), self.pack_length)
        if "sampled_completion" in examples[0]:
            batch.update(self.encoder.collate(examples, prefix="sampled_"))
        return {**batch, SOURCE_KEY: self.source}

    def pad_ids(self) -> dict[str, int]:
        """Pad id per tokenisation (key prefix) of the batches: the student's, and the teacher's when aligned."""
        pads = {"": self.tokenizer.pad_token_id}
        if isinstance(self.encoder, AlignedEncoder):
            pads["teacher_"] = self.encoder.teacher.tokenizer.pad_token_id
        return pads

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        self.setup()
        hook, depth = self.read_ahead or (None, 0)
        return ReadAheadLoader(
            self.splits[split],
            read_ahead=hook,
            depth=depth,
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
