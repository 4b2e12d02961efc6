"""A tokenised text split and its batches: rows of encodings read from the table a batch at once, padded per
tokenizer (the student's keys and, with a teacher tokenizer, the ``teacher_`` ones) by each tokenizer's own
collator; the tokenizers loaded from local directories and identified by what fixes their output."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

import datasets
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from transformers import AutoTokenizer, DataCollatorWithPadding, PreTrainedTokenizerBase

from kd_lightning.engine.errors import ConfigError

#: Prefix of the teacher tokenizer's keys in a batch's input dict (``teacher_input_ids``, ...).
TEACHER_PREFIX = "teacher_"
#: One row: the encodings by key, the label, the row's index.
Row = tuple[dict[str, list[int]], int, int]


class EncodedSplit(Dataset):
    """A tokenised split: row ``i`` is ``(encodings, label, i)``; a batch is read from the table at once."""

    def __init__(self, encodings: datasets.Dataset, labels: np.ndarray) -> None:
        self.encodings = encodings
        self.labels = labels

    def __len__(self) -> int:
        return len(self.encodings)

    def __getitem__(self, index: int) -> Row:
        return self.encodings[index], int(self.labels[index]), int(index)

    def __getitems__(self, indices: list[int]) -> list[Row]:
        columns = self.encodings[indices]
        return [
            ({name: values[j] for name, values in columns.items()}, int(self.labels[i]), i)
            for j, i in enumerate(indices)
        ]


class PadBatch:
    """Collate rows into ``(x, y)`` or ``(x, y, index)``: each tokenizer's keys (by prefix) padded to the
    longest row of the batch by its own collator."""

    def __init__(self, collators: Mapping[str, DataCollatorWithPadding], return_index: bool) -> None:
        self.collators = dict(collators)
        self.return_index = return_index

    def __call__(self, rows: list[Row]) -> tuple[Tensor | dict[str, Tensor], ...]:
        x: dict[str, Tensor] = {}
        for prefix, collator in self.collators.items():
            features = [
                {name.removeprefix(prefix): ids for name, ids in encodings.items() if owner(name) == prefix}
                for encodings, _, _ in rows
            ]
            x |= {prefix + name: tensor for name, tensor in collator(features).items()}
        y = torch.tensor([label for _, label, _ in rows], dtype=torch.long)
        if self.return_index:
            return x, y, torch.tensor([index for _, _, index in rows], dtype=torch.long)
        return x, y


def owner(name: str) -> str:
    """The prefix of the tokenizer that made the batch key ``name``."""
    return TEACHER_PREFIX if name.startswith(TEACHER_PREFIX) else ""


def load_tokenizer(key: str, value: str | Path | None) -> PreTrainedTokenizerBase:
    saved = "a directory holding a tokenizer saved with save_pretrained (tokenizer.json / tokenizer_config.json)"
    if value is None:
        raise ConfigError(f"{key} is not set; give {saved}")
    path = Path(value).expanduser()
    if not path.is_dir():
        raise ConfigError(f"{key}={value} is not a directory; give {saved} (nothing is downloaded)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as error:
        raise ConfigError(f"{key}={value} holds no tokenizer AutoTokenizer can load ({error}); give {saved}") from None
    if tokenizer.pad_token is None:
        raise ConfigError(
            f"{key}={value} has no pad token, which batches need; set one (e.g. tokenizer.pad_token = "
            "tokenizer.eos_token) and save it again"
        )
    return tokenizer


def tokenizer_identity(tokenizer: PreTrainedTokenizerBase) -> dict[str, str]:
    """A tokenizer's class and a sha256 of what fixes its output: the fast backend's definition (vocabulary,
    merges, normalizer, pre-tokenizer, post-processor; without the truncation and padding state that calls
    leave behind) or, for a slow tokenizer, its vocabulary; its special tokens and padding / truncation side."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        definition = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("truncation", "padding")}
    else:
        definition = sorted(tokenizer.get_vocab().items())
    state = {
        "definition": definition,
        "special_tokens": tokenizer.special_tokens_map,
        "padding_side": tokenizer.padding_side,
        "truncation_side": tokenizer.truncation_side,
        "model_input_names": list(tokenizer.model_input_names),
    }
    digest = hashlib.sha256(json.dumps(state, sort_keys=True, default=str).encode()).hexdigest()
    return {"class": type(tokenizer).__name__, "sha256": digest}
