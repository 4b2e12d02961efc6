"""TextClassificationDataModule: local CSV / JSON Lines / save_to_disk sources, labels, tokenisation, the batch
format (dynamic padding, teacher keys, indices) and the datamodule contract (content_identity, ordered loader)."""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path
from typing import Any

import datasets
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from transformers import AutoTokenizer

from kd_lightning.cli.common import CONFIG_DIR
from kd_lightning.data import TextClassificationDataModule
from kd_lightning.data.contract import CacheableData, HasExampleInput, HasTrainSize, check_cacheable
from kd_lightning.engine.errors import ConfigError
from kd_lightning.losses.base import UNLABELLED
from tests.text_fixtures import (
    SENTENCES,
    bpe_tokenizer,
    rows,
    word_tokenizer,
    write_csv,
    write_dataset_dict,
    write_jsonl,
)

LABELS = [i % 2 for i in range(len(SENTENCES))]
TRAIN, VAL, TEST = slice(0, 12), slice(12, 16), slice(16, 20)


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    return {"word": word_tokenizer(root / "word"), "bpe": bpe_tokenizer(root / "bpe")}


@pytest.fixture(scope="module")
def csv_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("csv")
    records = rows(LABELS)
    return {
        split: write_csv(root / f"{split}.csv", records[part])
        for split, part in (("train", TRAIN), ("val", VAL), ("test", TEST))
    }


def module(tokenizer: Path, **options: Any) -> TextClassificationDataModule:
    data = TextClassificationDataModule(tokenizer=str(tokenizer), **options)
    data.setup()
    return data


def files(paths: dict[str, Path]) -> dict[str, str]:
    return {f"{split}_file": str(path) for split, path in paths.items()}


def all_batches(data: TextClassificationDataModule, split: str) -> list[tuple[Any, ...]]:
    return list(data.ordered_dataloader(split))


def same_batches(a: list[tuple[Any, ...]], b: list[tuple[Any, ...]]) -> bool:
    def equal(u: Any, v: Any) -> bool:
        if isinstance(u, dict):
            return u.keys() == v.keys() and all(torch.equal(u[k], v[k]) for k in u)
        return torch.equal(u, v)

    return len(a) == len(b) and all(len(s) == len(t) and all(map(equal, s, t)) for s, t in zip(a, b, strict=True))


def test_csv_jsonl_and_saved_datasetdict_give_identical_batches(
    tokenizers: dict[str, Path], csv_files: dict[str, Path], tmp_path: Path
) -> None:
    records = rows(LABELS)
    parts = {"train": records[TRAIN], "val": records[VAL], "test": records[TEST]}
    jsonl = {split: write_jsonl(tmp_path / f"{split}.jsonl", part) for split, part in parts.items()}
    saved = write_dataset_dict(
        tmp_path / "saved", {"train": parts["train"], "validation": parts["val"], "test": parts["test"]}
    )
    one_split_dirs = {split: write_dataset_dict(tmp_path / split, {"x": part}) / "x" for split, part in parts.items()}
    options = {"batch_size": 3, "return_index": True}
    sources = [
        module(tokenizers["word"], **files(csv_files), **options),
        module(tokenizers["word"], **files(jsonl), **options),
        module(tokenizers["word"], path=str(saved), **options),
        module(tokenizers["word"], **files(one_split_dirs), format="hf", **options),
    ]
    for split in ("train", "val", "test"):
        reference = all_batches(sources[0], split)
        assert sum(len(batch[1]) for batch in reference) == len(parts[split])
        for other in sources[1:]:
            assert same_batches(reference, all_batches(other, split)), split
    assert sources[0].num_train_samples == 12 and sources[0].label_names == ("0", "1")


def test_batches_hold_the_rows_tokenised_and_padded_to_the_longest_row(
    tokenizers: dict[str, Path], csv_files: dict[str, Path]
) -> None:
    data = module(tokenizers["word"], **files(csv_files), batch_size=4, return_index=True)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizers["word"]))
    widths = set()
    for x, y, index in data.ordered_dataloader("train"):
        assert set(x) == {"input_ids", "token_type_ids", "attention_mask"}
        assert all(t.dtype == torch.int64 and t.shape == x["input_ids"].shape for t in x.values())
        assert y.dtype == torch.int64 and index.dtype == torch.int64
        lengths = [len(tokenizer(SENTENCES[i])["input_ids"]) for i in index.tolist()]
        assert x["input_ids"].shape[1] == max(lengths)  # dynamic padding: this batch's longest row
        widths.add(x["input_ids"].shape[1])
        for row, length in enumerate(lengths):
            mask = x["attention_mask"][row]
            assert mask[:length].all() and not mask[length:].any()
            assert (x["input_ids"][row, length:] == tokenizer.pad_token_id).all()
            assert x["input_ids"][row, :length].tolist() == tokenizer(SENTENCES[index[row]])["input_ids"]
        assert y.tolist() == [LABELS[i] for i in index.tolist()]
    assert len(widths) > 1  # widths differ between batches: padded per batch, not to max_length


def test_max_length_truncates(tokenizers: dict[str, Path], csv_files: dict[str, Path]) -> None:
    data = module(tokenizers["word"], **files(csv_files), max_length=5)
    x, _ = next(iter(data.ordered_dataloader("train")))
    assert x["input_ids"].shape[1] == 5 and x["attention_mask"].sum(1).max() == 5


def test_teacher_keys_only_with_a_teacher_tokenizer_and_decode_to_the_same_text(
    tokenizers: dict[str, Path], csv_files: dict[str, Path]
) -> None:
    plain = module(tokenizers["word"], **files(csv_files))
    assert not any(key.startswith("teacher_") for key in plain.example_input())
    data = module(tokenizers["word"], **files(csv_files), teacher_tokenizer=str(tokenizers["bpe"]), batch_size=5)
    student = AutoTokenizer.from_pretrained(str(tokenizers["word"]))
    teacher = AutoTokenizer.from_pretrained(str(tokenizers["bpe"]))
    x, _ = next(iter(data.ordered_dataloader("train")))
    assert set(x) == {"input_ids", "token_type_ids", "attention_mask", "teacher_input_ids", "teacher_attention_mask"}
    assert x["teacher_input_ids"].shape[1] != x["input_ids"].shape[1]  # each padded to its own longest row
    assert x["teacher_input_ids"].shape[1] == x["teacher_attention_mask"].sum(1).max()
    for row in range(len(x["input_ids"])):
        said = student.decode(x["input_ids"][row], skip_special_tokens=True)
        heard = teacher.decode(x["teacher_input_ids"][row], skip_special_tokens=True)
        assert said == heard == SENTENCES[row]


def test_sentence_pairs_get_segments(tokenizers: dict[str, Path], tmp_path: Path) -> None:
    pairs = enumerate(itertools.pairwise(SENTENCES))
    records = [{"premise": a, "hypothesis": b, "label": i % 3} for i, (a, b) in pairs]
    train = write_jsonl(tmp_path / "pairs.jsonl", records)
    data = module(
        tokenizers["word"], train_file=str(train), text_column="premise", text_pair_column="hypothesis", num_classes=3
    )
    x = data.example_input()
    row = data.splits["val"].encodings[0]
    assert x["token_type_ids"][0, : len(row["input_ids"])].tolist() == row["token_type_ids"]
    assert set(row["token_type_ids"]) == {0, 1}  # [CLS] a [SEP] b [SEP]: two segments


def test_string_labels_map_to_sorted_ids(tokenizers: dict[str, Path], tmp_path: Path) -> None:
    names = ["pos", "neg", "neutral", "pos", "neg"] * 4
    train = write_csv(tmp_path / "train.csv", rows(names))
    val = write_csv(tmp_path / "val.csv", rows(["neutral", "pos"], SENTENCES[:2]))
    data = module(tokenizers["word"], train_file=str(train), val_file=str(val), num_classes=3, return_index=True)
    assert data.label_names == ("neg", "neutral", "pos")
    ids = {"neg": 0, "neutral": 1, "pos": 2}
    _, y, index = next(iter(data.ordered_dataloader("train")))
    assert y.tolist() == [ids[names[i]] for i in index.tolist()]
    assert next(iter(data.ordered_dataloader("val")))[1].tolist() == [1, 2]

    unseen = write_csv(tmp_path / "unseen.csv", rows(["other"], SENTENCES[:1]))
    with pytest.raises(ConfigError, match=r"data\.label_column.*'other'"):
        module(tokenizers["word"], train_file=str(train), val_file=str(unseen), num_classes=3)


def test_index_follows_rows_through_shuffling(tokenizers: dict[str, Path], csv_files: dict[str, Path]) -> None:
    data = module(tokenizers["word"], **files(csv_files), batch_size=5, return_index=True)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizers["word"]))
    seen = []
    torch.manual_seed(0)
    for x, y, index in data.train_dataloader():
        for row, i in enumerate(index.tolist()):
            length = int(x["attention_mask"][row].sum())
            assert x["input_ids"][row, :length].tolist() == tokenizer(SENTENCES[i])["input_ids"]
            assert y[row] == LABELS[i]
        seen += index.tolist()
    assert sorted(seen) == list(range(data.num_train_samples)) and seen != sorted(seen)
    assert len(next(iter(module(tokenizers["word"], **files(csv_files)).train_dataloader()))) == 2  # (x, y)


def test_ordered_dataloader_is_in_index_order(tokenizers: dict[str, Path], csv_files: dict[str, Path]) -> None:
    data = module(tokenizers["word"], **files(csv_files), batch_size=5, return_index=True)
    for split, count in (("train", 12), ("val", 4), ("test", 4)):
        indices = torch.cat([batch[2] for batch in data.ordered_dataloader(split)])
        assert indices.tolist() == list(range(count))
    assert len(data.ordered_dataloader("train").dataset) == data.num_train_samples == 12


def test_validation_split_from_train_is_deterministic_and_disjoint(tokenizers: dict[str, Path], tmp_path: Path) -> None:
    labels = [UNLABELLED if i % 5 == 0 else i % 2 for i in range(len(SENTENCES))]  # 4 unlabelled rows
    train = write_jsonl(tmp_path / "train.jsonl", rows(labels))

    def split_texts(data: TextClassificationDataModule) -> dict[str, list[int]]:
        student = AutoTokenizer.from_pretrained(str(tokenizers["word"]))
        return {
            name: [SENTENCES.index(student.decode(r["input_ids"], skip_special_tokens=True)) for r in split.encodings]
            for name, split in data.splits.items()
        }

    options = {"train_file": str(train), "val_fraction": 0.25}
    first = split_texts(module(tokenizers["word"], **options))
    assert first == split_texts(module(tokenizers["word"], **options))  # the same rows every time
    assert len(first["val"]) == 4 and len(first["train"]) == 16  # a quarter of the 16 labelled rows
    assert not set(first["val"]) & set(first["train"]) and sorted(first["val"] + first["train"]) == list(range(20))
    assert all(labels[i] != UNLABELLED for i in first["val"])  # unlabelled rows stay in training
    assert first["train"] == sorted(first["train"]) and first["val"] == sorted(first["val"])  # file order kept
    assert split_texts(module(tokenizers["word"], **options, split_seed=1))["val"] != first["val"]
    data = module(tokenizers["word"], **options, return_index=True, batch_size=20)
    _, y, _ = next(iter(data.ordered_dataloader("train")))
    assert (y == UNLABELLED).sum() == 4 and data.num_train_samples == 16


def test_content_identity_follows_what_fixes_the_inputs(
    tokenizers: dict[str, Path], csv_files: dict[str, Path], tmp_path: Path
) -> None:
    def identity(tokenizer: Path = tokenizers["word"], **options: Any) -> dict[str, Any]:
        data = TextClassificationDataModule(tokenizer=str(tokenizer), **{**files(csv_files), **options})
        return data.content_identity()

    base = identity()
    assert identity(batch_size=7, num_workers=2, return_index=True) == base
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    copies = {split: Path(shutil.copy(path, moved / path.name)) for split, path in csv_files.items()}
    assert identity(**files(copies)) == base  # where the files sit does not matter
    moved_tokenizer = Path(shutil.copytree(tokenizers["word"], tmp_path / "tokenizer"))
    assert identity(moved_tokenizer) == base
    changed = tmp_path / "changed.csv"
    write_csv(changed, rows(LABELS[TRAIN], ["the cat sat", *SENTENCES[1:12]]))
    assert identity(train_file=str(changed)) != base
    assert identity(tokenizers["bpe"]) != base
    assert identity(teacher_tokenizer=str(tokenizers["bpe"])) != base
    assert identity(max_length=16) != base
    assert identity(text_column="label") != base

    # a saved DatasetDict: its files' digest, the same for the same rows saved elsewhere after another history
    # (state.json's fingerprint differs then)
    records = rows(LABELS)
    first = write_dataset_dict(tmp_path / "one", {"train": records[TRAIN], "test": records[TEST]})
    second = tmp_path / "two"
    reordered = datasets.Dataset.from_list(records[TRAIN][::-1]).select(range(11, -1, -1))
    datasets.DatasetDict({"train": reordered, "test": datasets.Dataset.from_list(records[TEST])}).save_to_disk(second)
    assert (first / "train" / "state.json").read_text() != (second / "train" / "state.json").read_text()
    other = write_dataset_dict(tmp_path / "three", {"train": records[VAL], "test": records[TEST]})
    one, two, three = (
        TextClassificationDataModule(tokenizer=str(tokenizers["word"]), path=str(p)).content_identity()
        for p in (first, second, other)
    )
    assert one == two != three


def test_contract_members(tokenizers: dict[str, Path], csv_files: dict[str, Path]) -> None:
    data = module(tokenizers["word"], **files(csv_files))
    assert isinstance(data, CacheableData) and isinstance(data, HasExampleInput) and isinstance(data, HasTrainSize)
    assert data.random_augmentation is False
    check_cacheable(data, "teacher_cache")
    x = data.example_input()
    assert isinstance(x, dict) and x["input_ids"].shape[0] == 2
    assert x["attention_mask"].sum(1).max() == x["input_ids"].shape[1]


def test_loading_writes_nothing_to_the_datasets_cache(
    tokenizers: dict[str, Path], csv_files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "hf_datasets_cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    module(tokenizers["word"], **files(csv_files))
    assert not cache.exists() or not any(cache.iterdir())


def test_config_file_instantiates(tokenizers: dict[str, Path], csv_files: dict[str, Path]) -> None:
    node = OmegaConf.load(Path(CONFIG_DIR) / "data" / "text.yaml")
    data = instantiate(node, tokenizer=str(tokenizers["word"]), **files(csv_files))
    assert isinstance(data, TextClassificationDataModule) and data.return_index is False
    assert data.num_train_samples == 12


def test_errors_name_the_key(tokenizers: dict[str, Path], csv_files: dict[str, Path], tmp_path: Path) -> None:
    word = tokenizers["word"]
    missing = tmp_path / "nowhere" / "train.csv"
    with pytest.raises(ConfigError, match=rf"data\.train_file={missing} does not exist.*columns text / label"):
        module(word, train_file=str(missing))
    with pytest.raises(ConfigError, match=r"data\.val_file=.*does not exist"):
        module(word, train_file=str(csv_files["train"]), val_file=str(missing))
    with pytest.raises(ConfigError, match=r"data\.path=.*is not a directory.*train / validation"):
        module(word, path=str(tmp_path / "no_dir"))
    with pytest.raises(ConfigError, match=r"data\.train_file is not set"):
        module(word)
    with pytest.raises(ConfigError, match=r"data\.tokenizer=.*is not a directory"):
        module(tmp_path / "no_tokenizer", **files(csv_files))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=r"data\.tokenizer=.*holds no tokenizer"):
        module(empty, **files(csv_files))
    with pytest.raises(ConfigError, match=r"data\.train_file=.*could not be read as hf"):
        module(word, train_file=str(empty))
    with pytest.raises(ConfigError, match=r"data\.text_column='sentence' is not a column.*text, label"):
        module(word, **files(csv_files), text_column="sentence")
    with pytest.raises(ConfigError, match=r"data\.num_classes=3 but the data has 2 classes.*data\.num_classes=2"):
        module(word, **files(csv_files), num_classes=3)
    with pytest.raises(ConfigError, match=r"data\.format"):
        module(word, train_file=str(write_jsonl(tmp_path / "train.txt", rows(LABELS))))
    unlabelled_val = write_csv(tmp_path / "val.csv", rows([UNLABELLED, 1], SENTENCES[:2]))
    with pytest.raises(ConfigError, match=r"data\.label_column.*val\.csv has 1 unlabelled rows"):
        module(word, train_file=str(csv_files["train"]), val_file=str(unlabelled_val))
    no_test = module(word, train_file=str(csv_files["train"]), val_file=str(csv_files["val"]))
    with pytest.raises(ConfigError, match=r"data\.test_file"):
        no_test.test_dataloader()
    with pytest.raises(ConfigError, match=r"data\.path=.* and data\.train_file"):
        TextClassificationDataModule(tokenizer=str(word), path=str(tmp_path), train_file=str(csv_files["train"]))
    with pytest.raises(ConfigError, match=r"data\.max_length"):
        TextClassificationDataModule(tokenizer=str(word), max_length=True)
