"""Tiny text-classification data in the real on-disk formats, and tokenizers trained locally on it."""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

#: Lower-case words only, so both tokenizers decode a row back to the same text.
SENTENCES = [
    "the cat sat on the mat",
    "a dog ran",
    "birds sing in the early morning light",
    "rain again",
    "the old man and the sea",
    "she reads a long book every night before sleep",
    "quiet",
    "we walked to the river and back",
    "coffee is hot",
    "the train was late today",
    "green hills far away",
    "he plays the piano",
    "snow fell all night on the town",
    "good",
    "the market opens at nine",
    "children laugh in the park",
    "my phone is broken",
    "stars shine bright above the desert tonight",
    "tea",
    "they sold the house last summer",
]


def rows(labels: Sequence[Any], sentences: Sequence[str] = SENTENCES) -> list[dict[str, Any]]:
    """``[{"text": ..., "label": ...}]``, the sentences paired with ``labels`` in order."""
    return [{"text": text, "label": label} for text, label in zip(sentences, labels, strict=True)]


def write_csv(path: Path, records: Sequence[Mapping[str, Any]]) -> Path:
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    return path


def write_jsonl(path: Path, records: Sequence[Mapping[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(dict(record)) + "\n" for record in records))
    return path


def write_dataset_dict(path: Path, splits: Mapping[str, Sequence[Mapping[str, Any]]]) -> Path:
    """``splits`` saved with ``DatasetDict.save_to_disk`` (split names as given: train, validation, ...)."""
    from datasets import Dataset, DatasetDict

    DatasetDict({name: Dataset.from_list(list(records)) for name, records in splits.items()}).save_to_disk(str(path))
    return path


def word_tokenizer(directory: Path, corpus: Sequence[str] = SENTENCES) -> Path:
    """A word-level tokenizer (BERT-like: ``[CLS] a [SEP] b [SEP]``, token_type_ids) saved in ``directory``."""
    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    tokenizer.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=specials))
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    ).save_pretrained(str(directory))
    return directory


def bpe_tokenizer(directory: Path, corpus: Sequence[str] = SENTENCES, vocab_size: int = 300) -> Path:
    """A byte-level BPE tokenizer (GPT-like: sub-word pieces, no token_type_ids) saved in ``directory``."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=["<pad>", "<unk>", "<s>", "</s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    ).save_pretrained(str(directory))
    return directory
