"""How the text datamodule tokenises its rows: one or two tokenizers over the text columns, once per split.

:class:`TextTokenization` holds the tokenizers (the student's and, optionally, the teacher's, loaded once from
local directories), tokenises a split's rows with each (the teacher's keys prefixed ``teacher_``) and states
what fixes a row's tokenisation (:meth:`TextTokenization.identity`, part of the teacher cache's key). The
datamodule is :class:`~kd_lightning.data.text.TextClassificationDataModule`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import datasets
from transformers import PreTrainedTokenizerBase

from kd_lightning.data.text_batches import TEACHER_PREFIX, load_tokenizer, tokenizer_identity
from kd_lightning.engine.errors import ConfigError


class TextTokenization:
    """Tokenisation of ``text_column`` (and ``text_pair_column``: sentence pairs) by the tokenizer saved in
    ``tokenizer`` and, with ``teacher_tokenizer`` set, by that one too (keys prefixed ``teacher_``); rows are
    truncated to ``max_length`` tokens (None: not truncated). A missing text is a :class:`ConfigError` naming
    its column key and the rows' origin."""

    def __init__(
        self,
        tokenizer: str | Path | None,
        teacher_tokenizer: str | Path | None,
        text_column: str,
        text_pair_column: str | None,
        label_column: str,
        max_length: int | None,
    ) -> None:
        self.tokenizer_dir = tokenizer
        self.teacher_tokenizer_dir = teacher_tokenizer
        self.text_column = text_column
        self.text_pair_column = text_pair_column
        self.label_column = label_column
        self.max_length = max_length
        self._tokenizers: dict[str, PreTrainedTokenizerBase] = {}
        self._identities: dict[str, dict[str, str]] = {}

    def tokenizers(self) -> dict[str, PreTrainedTokenizerBase]:
        """The tokenizers by the prefix of their keys in a batch: ``""`` (the student's) and, with
        ``teacher_tokenizer`` set, ``"teacher_"``; loaded once."""
        if not self._tokenizers:
            self._tokenizers[""] = load_tokenizer("data.tokenizer", self.tokenizer_dir)
            if self.teacher_tokenizer_dir is not None:
                self._tokenizers[TEACHER_PREFIX] = load_tokenizer("data.teacher_tokenizer", self.teacher_tokenizer_dir)
            self._identities = {prefix: tokenizer_identity(t) for prefix, t in self._tokenizers.items()}
        return self._tokenizers

    def tokenize(self, batch: Mapping[str, list[Any]], origin: str) -> dict[str, list[list[int]]]:
        """A batch of rows (columns of values) as every tokenizer's encodings, keys prefixed per tokenizer."""
        texts = batch[self.text_column]
        pairs = batch[self.text_pair_column] if self.text_pair_column else None
        for key, column, values in (
            ("data.text_column", self.text_column, texts),
            ("data.text_pair_column", self.text_pair_column, pairs or ()),
        ):
            if None in values:
                raise ConfigError(f"{key}={column!r} of {origin} has an empty row; give every row a text")
        encoded: dict[str, list[list[int]]] = {}
        for prefix, tokenizer in self.tokenizers().items():
            out = tokenizer(
                texts,
                pairs,
                truncation=self.max_length is not None,
                max_length=self.max_length,
                return_attention_mask=True,
            )
            encoded |= {prefix + name: ids for name, ids in out.items()}
        return encoded

    def encode_split(self, split: str, rows: datasets.Dataset, origin: str) -> datasets.Dataset:
        """``rows`` tokenised (batched, in memory; the new fingerprint stands in for hashing the tokenizers)."""
        settings = json.dumps([rows._fingerprint, self.identity()], sort_keys=True)
        return rows.map(
            self.tokenize,
            batched=True,
            fn_kwargs={"origin": origin},
            remove_columns=rows.column_names,
            keep_in_memory=True,
            new_fingerprint=hashlib.sha256(settings.encode()).hexdigest()[:32],
            desc=f"tokenizing {split}",
        )

    def identity(self) -> dict[str, Any]:
        """What fixes a row's tokenisation: the columns, ``max_length`` and each tokenizer's identity."""
        self.tokenizers()
        return {
            "columns": {"text": self.text_column, "text_pair": self.text_pair_column, "label": self.label_column},
            "max_length": self.max_length,
            "tokenizer": self._identities[""],
            "teacher_tokenizer": self._identities.get(TEACHER_PREFIX),
        }
