"""Text classification from local files (CSV, JSON Lines, or a ``save_to_disk`` directory), tokenised with
Hugging Face tokenizers saved on disk; nothing is ever downloaded.

Needs the optional ``datasets`` and ``transformers`` packages; :mod:`kd_lightning.data` imports this module
only when :class:`TextClassificationDataModule` is first used.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from kd_lightning.data.contract import check_loader_options
from kd_lightning.engine.caching.store import file_digest
from kd_lightning.engine.errors import ConfigError, check_type
from kd_lightning.losses.base import UNLABELLED

try:
    import datasets
    from transformers import AutoTokenizer, DataCollatorWithPadding, PreTrainedTokenizerBase
except ModuleNotFoundError as missing:  # pragma: no cover - depends on the installed extras
    raise ModuleNotFoundError(
        f"kd_lightning.data.TextClassificationDataModule needs the `datasets` and `transformers` packages "
        f"({missing.name} is missing): pip install datasets transformers"
    ) from missing

#: Prefix of the teacher tokenizer's keys in a batch's input dict (``teacher_input_ids``, ...).
TEACHER_PREFIX = "teacher_"
FORMATS = ("auto", "csv", "jsonl", "hf")
_SUFFIX_FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl"}
#: The split names a saved DatasetDict (``data.path``) may use for each of our splits, in order of preference.
_DICT_SPLITS = {"train": ("train",), "val": ("validation", "val"), "test": ("test",)}
_FILE_KEYS = {"train": "data.train_file", "val": "data.val_file", "test": "data.test_file"}
_PathValue = str | Path | None

Row = tuple[dict[str, list[int]], int, int]


class TextClassificationDataModule(L.LightningDataModule):
    """Sentence (or sentence-pair) classification from local data, tokenised once per split.

    Sources, all local (a missing one is a :class:`ConfigError` naming its key; nothing is downloaded):
    ``train_file`` / ``val_file`` / ``test_file``, each a CSV file, a JSON Lines file or a directory saved
    with ``datasets.Dataset.save_to_disk`` (``format``: ``auto`` tells them apart by suffix / directory), or
    ``path``, a saved ``DatasetDict`` with splits ``train``, ``validation`` (or ``val``) and ``test``. Without
    a validation split, ``val_fraction`` of the labelled training rows (drawn with ``split_seed``) become the
    validation split; without a test split, :meth:`test_dataloader` refuses.

    Columns: ``text_column``, optional ``text_pair_column`` (sentence pairs) and ``label_column``. Labels are
    ints ``0 .. num_classes - 1`` (``-1``, :data:`~kd_lightning.losses.UNLABELLED`, marks an unlabelled row,
    allowed in training only) or strings, numbered in the sorted order of the training split's names;
    :attr:`label_names` holds the names (a ``ClassLabel``'s names, or ``"0"``, ``"1"``, ... for plain ints).
    ``num_classes`` must match the data.

    Tokenisation: ``tokenizer`` (the student's) and optional ``teacher_tokenizer`` are directories that
    ``transformers.AutoTokenizer.from_pretrained`` loads (saved with ``save_pretrained``); rows are truncated
    to ``max_length`` tokens (None: not truncated) and padded per batch to the batch's longest row
    (``DataCollatorWithPadding``, one per tokenizer).

    Batches are ``(x, y)`` or, with ``return_index=True``, ``(x, y, index)``: ``x`` a dict of int64 tensors
    ``(B, L)`` with ``input_ids``, ``attention_mask`` (and ``token_type_ids`` if the tokenizer makes them)
    from the student's tokenizer and, only with ``teacher_tokenizer`` set, the teacher's keys prefixed
    ``teacher_`` (``teacher_input_ids``, ``teacher_attention_mask``, ...; their own width ``L'``); ``y``
    int64 ``(B,)``; ``index`` int64 ``(B,)``, the rows' positions in their split (training:
    ``0 .. num_train_samples - 1``).

    Contract members (:mod:`kd_lightning.data.contract`): ``random_augmentation = False``,
    :meth:`content_identity`, :meth:`ordered_dataloader`, :meth:`example_input` (a dict batch of two
    validation rows), :attr:`num_train_samples`, and the ``return_index`` argument.
    """

    #: A row index fixes the input exactly, so teacher outputs can be cached (``teacher_cache``).
    random_augmentation = False

    def __init__(
        self,
        tokenizer: _PathValue = None,
        train_file: _PathValue = None,
        val_file: _PathValue = None,
        test_file: _PathValue = None,
        path: _PathValue = None,
        format: str = "auto",
        text_column: str = "text",
        text_pair_column: str | None = None,
        label_column: str = "label",
        num_classes: int = 2,
        teacher_tokenizer: _PathValue = None,
        max_length: int | None = 128,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        batch_size: int = 32,
        num_workers: int = 0,
        pin_memory: bool = False,
        return_index: bool = False,
        transfer_samples: int | None = None,
    ) -> None:
        super().__init__()
        check_type(transfer_samples, (int, type(None)), "data.transfer_samples")
        if transfer_samples is not None and transfer_samples < 0:
            raise ConfigError(f"data.transfer_samples={transfer_samples} must be >= 0 (null: every unlabelled row)")
        for key, value in (
            ("tokenizer", tokenizer),
            ("teacher_tokenizer", teacher_tokenizer),
            ("train_file", train_file),
            ("val_file", val_file),
            ("test_file", test_file),
            ("path", path),
        ):
            check_type(value, (str, Path, type(None)), f"data.{key}")
        for key, value in (("format", format), ("text_column", text_column), ("label_column", label_column)):
            check_type(value, str, f"data.{key}")
        check_type(text_pair_column, (str, type(None)), "data.text_pair_column")
        for key, value in (("num_classes", num_classes), ("split_seed", split_seed)):
            check_type(value, int, f"data.{key}")
        check_loader_options(batch_size, num_workers, pin_memory, return_index)
        check_type(max_length, (int, type(None)), "data.max_length")
        check_type(val_fraction, (float, int), "data.val_fraction")
        if format not in FORMATS:
            raise ConfigError(f"data.format={format!r} must be one of {', '.join(FORMATS)}")
        if path is not None and any(f is not None for f in (train_file, val_file, test_file)):
            raise ConfigError(
                f"data.path={path} and data.train_file / val_file / test_file are both set; set data.path (a "
                "saved DatasetDict) or the files, not both"
            )
        if num_classes < 2:
            raise ConfigError(f"data.num_classes={num_classes} must be >= 2")
        if max_length is not None and max_length < 1:
            raise ConfigError(f"data.max_length={max_length} must be >= 1 (null: no truncation)")
        if not 0 < val_fraction < 1:
            raise ConfigError(f"data.val_fraction={val_fraction} must be in (0, 1)")
        self.tokenizer_dir = tokenizer
        self.teacher_tokenizer_dir = teacher_tokenizer
        self.files = {"train": train_file, "val": val_file, "test": test_file}
        self.path = path
        self.format = format
        self.text_column = text_column
        self.text_pair_column = text_pair_column
        self.label_column = label_column
        self.num_classes = num_classes
        self.max_length = max_length
        self.val_fraction = float(val_fraction)
        self.split_seed = split_seed
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.return_index = return_index
        self.transfer_samples = transfer_samples
        self.splits: dict[str, EncodedSplit] = {}
        self._tokenizers: dict[str, PreTrainedTokenizerBase] = {}
        self._tokenizer_identities: dict[str, dict[str, str]] = {}
        self._label_names: tuple[str, ...] = ()

    # --- sources -----------------------------------------------------------------------------------------

    def _layout(self) -> str:
        columns = [self.text_column, *([self.text_pair_column] if self.text_pair_column else []), self.label_column]
        return "columns " + " / ".join(columns)

    def _sources(self) -> dict[str, tuple[str, Path, str]]:
        """The configured sources, checked to exist: ``{name: (key, path, format)}``, ``name`` a split
        (``train``, ``val``, ``test``) or ``path`` (a saved DatasetDict holding the splits)."""
        if self.path is not None:
            path = Path(self.path).expanduser()
            if not path.is_dir():
                raise ConfigError(
                    f"data.path={self.path} is not a directory; expected a DatasetDict saved with save_to_disk, "
                    f"with splits train / validation (or val) / test and {self._layout()}; nothing is downloaded"
                )
            return {"path": ("data.path", path, "hf")}
        if self.files["train"] is None:
            raise ConfigError(
                f"data.train_file is not set; give a CSV or JSON Lines file (or a save_to_disk directory) with "
                f"{self._layout()}, or set data.path to a saved DatasetDict"
            )
        return {
            split: (_FILE_KEYS[split], *self._file_source(_FILE_KEYS[split], value))
            for split, value in self.files.items()
            if value is not None
        }

    def _file_source(self, key: str, value: str | Path) -> tuple[Path, str]:
        path = Path(value).expanduser()
        if not path.exists():
            raise ConfigError(
                f"{key}={value} does not exist; expected a CSV or JSON Lines file (or a directory saved with "
                f"datasets' save_to_disk) with {self._layout()}; nothing is downloaded"
            )
        kind = self.format
        if kind == "auto":
            kind = "hf" if path.is_dir() else _SUFFIX_FORMATS.get(path.suffix.lower(), "")
            if not kind:
                raise ConfigError(
                    f"{key}={value}: the suffix {path.suffix!r} does not tell the format; set data.format to "
                    "csv, jsonl or hf"
                )
        if (kind == "hf") != path.is_dir():
            what = "a directory" if path.is_dir() else "a file"
            raise ConfigError(f"{key}={value} is {what}, which data.format={kind} cannot read; set data.format=auto")
        return path, kind

    def _read_splits(self) -> tuple[dict[str, datasets.Dataset], dict[str, str]]:
        """Every available split's rows, in memory, and where each came from (for error messages)."""
        sources = self._sources()
        if "path" in sources:
            key, path, _ = sources["path"]
            saved = _read(key, path, "hf")
            if not isinstance(saved, datasets.DatasetDict):
                raise ConfigError(
                    f"{key}={self.path} holds a single Dataset, not a DatasetDict with splits train / validation / "
                    "test; set data.train_file to it instead"
                )
            rows, origins = {}, {}
            for split, names in _DICT_SPLITS.items():
                name = next((n for n in names if n in saved), None)
                if name is not None:
                    rows[split], origins[split] = saved[name], f"{key}={self.path} (split {name})"
            if "train" not in rows:
                raise ConfigError(f"{key}={self.path} has no train split (found: {', '.join(saved)})")
        else:
            rows, origins = {}, {}
            for split, (key, path, kind) in sources.items():
                dataset = _read(key, path, kind)
                if isinstance(dataset, datasets.DatasetDict):
                    raise ConfigError(
                        f"{key}={self.files[split]} holds a DatasetDict; set data.path to it, or give one split's "
                        "directory"
                    )
                rows[split], origins[split] = dataset, f"{key}={self.files[split]}"
        for split, dataset in rows.items():
            for key, column in (
                ("data.text_column", self.text_column),
                ("data.text_pair_column", self.text_pair_column),
                ("data.label_column", self.label_column),
            ):
                if column is not None and column not in dataset.column_names:
                    raise ConfigError(
                        f"{key}={column!r} is not a column of {origins[split]} (its columns: "
                        f"{', '.join(dataset.column_names)}); expected {self._layout()}"
                    )
        return rows, origins

    # --- labels ------------------------------------------------------------------------------------------

    def _encode_labels(self, rows: Mapping[str, datasets.Dataset], origins: Mapping[str, str]) -> dict[str, np.ndarray]:
        """Every split's labels as int64 class ids (``-1``: unlabelled), checked against ``num_classes``;
        sets :attr:`label_names`."""
        key = f"data.label_column={self.label_column!r}"
        feature = rows["train"].features[self.label_column]
        values = {split: list(dataset[self.label_column]) for split, dataset in rows.items()}
        for split, column in values.items():
            if None in column:
                raise ConfigError(
                    f"{key} of {origins[split]} is empty in row {column.index(None)}; give every row a label "
                    f"(int labels: {UNLABELLED} marks an unlabelled training row)"
                )
        if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
            names = tuple(sorted(set(values["train"])))
            ids = {name: i for i, name in enumerate(names)}
            labels = {}
            for split, column in values.items():
                unknown = next((v for v in column if str(v) not in ids), None)
                if unknown is not None:
                    raise ConfigError(
                        f"{key} of {origins[split]} has the label {unknown!r}, which the training split lacks "
                        f"(its labels: {_listing(names)})"
                    )
                labels[split] = np.array([ids[str(v)] for v in column], dtype=np.int64)
            how = f"training labels {_listing(names)}"
        elif isinstance(feature, datasets.ClassLabel) or (
            isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint"))
        ):
            try:
                labels = {split: np.asarray(column, dtype=np.int64) for split, column in values.items()}
            except (TypeError, ValueError):
                raise ConfigError(
                    f"{key} holds ints in {origins['train']} but not in every split; use one kind of label"
                ) from None
            for split, ids in labels.items():
                if (ids < UNLABELLED).any():
                    raise ConfigError(
                        f"{key} of {origins[split]} has the label {ids.min()}; labels are 0 .. num_classes - 1 "
                        f"({UNLABELLED}: unlabelled, training only)"
                    )
                if split != "train" and (ids == UNLABELLED).any():
                    raise ConfigError(
                        f"{key} of {origins[split]} has {int((ids == UNLABELLED).sum())} unlabelled rows (label "
                        f"{UNLABELLED}); only the training split may have them"
                    )
            if isinstance(feature, datasets.ClassLabel):
                names, how = tuple(feature.names), f"the ClassLabel names {_listing(feature.names)}"
            else:
                count = max((int(ids.max()) + 1 for ids in labels.values() if len(ids)), default=0)
                names, how = tuple(map(str, range(count))), f"labels 0 .. {count - 1}"
        else:
            raise ConfigError(
                f"{key} of {origins['train']} holds {feature} values; labels must be ints 0 .. num_classes - 1 "
                f"({UNLABELLED}: unlabelled) or strings"
            )
        found = len(names)
        if found != self.num_classes:
            raise ConfigError(
                f"data.num_classes={self.num_classes} but the data has {found} classes ({how}); set "
                f"data.num_classes={found}"
            )
        self._label_names = names
        return labels

    def _limit_unlabelled(self, rows: dict[str, datasets.Dataset], labels: dict[str, np.ndarray]) -> None:
        """Keep the first ``transfer_samples`` unlabelled training rows (all of them when None)."""
        if self.transfer_samples is None:
            return
        unlabelled = np.flatnonzero(labels["train"] == UNLABELLED)
        if len(unlabelled) <= self.transfer_samples:
            return
        kept = np.setdiff1d(np.arange(len(labels["train"])), unlabelled[self.transfer_samples :])
        rows["train"], labels["train"] = rows["train"].select(kept), labels["train"][kept]

    def _split_validation(self, rows: dict[str, datasets.Dataset], labels: dict[str, np.ndarray]) -> None:
        """Move ``val_fraction`` of the labelled training rows (drawn with ``split_seed``) into ``val``; both
        keep their file order."""
        labelled = np.flatnonzero(labels["train"] != UNLABELLED)
        count = max(1, round(len(labelled) * self.val_fraction))
        if count >= len(labelled):
            raise ConfigError(
                f"data.val_fraction={self.val_fraction} of {len(labelled)} labelled training rows leaves none to "
                "train on; lower it or set data.val_file"
            )
        chosen = np.sort(np.random.default_rng(self.split_seed).permutation(labelled)[:count])
        kept = np.setdiff1d(np.arange(len(labels["train"])), chosen)
        train = rows["train"]
        rows["train"], rows["val"] = train.select(kept), train.select(chosen)
        labels["train"], labels["val"] = labels["train"][kept], labels["train"][chosen]

    # --- tokenisation ------------------------------------------------------------------------------------

    def tokenizers(self) -> dict[str, PreTrainedTokenizerBase]:
        """The tokenizers by the prefix of their keys in a batch: ``""`` (the student's) and, with
        ``teacher_tokenizer`` set, ``"teacher_"``; loaded once."""
        if not self._tokenizers:
            self._tokenizers[""] = _load_tokenizer("data.tokenizer", self.tokenizer_dir)
            if self.teacher_tokenizer_dir is not None:
                self._tokenizers[TEACHER_PREFIX] = _load_tokenizer("data.teacher_tokenizer", self.teacher_tokenizer_dir)
            self._tokenizer_identities = {prefix: tokenizer_identity(t) for prefix, t in self._tokenizers.items()}
        return self._tokenizers

    def _tokenize(self, batch: Mapping[str, list[Any]], origin: str) -> dict[str, list[list[int]]]:
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

    def _encode_split(self, split: str, rows: datasets.Dataset, origin: str) -> datasets.Dataset:
        """``rows`` tokenised (batched, in memory; the new fingerprint stands in for hashing the tokenizers)."""
        settings = json.dumps([rows._fingerprint, self._tokenization_identity()], sort_keys=True)
        return rows.map(
            self._tokenize,
            batched=True,
            fn_kwargs={"origin": origin},
            remove_columns=rows.column_names,
            keep_in_memory=True,
            new_fingerprint=hashlib.sha256(settings.encode()).hexdigest()[:32],
            desc=f"tokenizing {split}",
        )

    def _tokenization_identity(self) -> dict[str, Any]:
        """What fixes a row's tokenisation: the columns, ``max_length`` and each tokenizer's identity."""
        self.tokenizers()
        return {
            "columns": {"text": self.text_column, "text_pair": self.text_pair_column, "label": self.label_column},
            "max_length": self.max_length,
            "tokenizer": self._tokenizer_identities[""],
            "teacher_tokenizer": self._tokenizer_identities.get(TEACHER_PREFIX),
        }

    # --- LightningDataModule -----------------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Check that the sources and tokenizers exist (nothing to download)."""
        self._sources()
        self.tokenizers()

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        self.tokenizers()
        with quiet_datasets():
            rows, origins = self._read_splits()
            labels = self._encode_labels(rows, origins)
            self._limit_unlabelled(rows, labels)
            if "val" not in rows:
                self._split_validation(rows, labels)
                origins["val"] = f"{origins['train']} (data.val_fraction={self.val_fraction})"
            self.splits = {
                split: EncodedSplit(self._encode_split(split, dataset, origins[split]), labels[split])
                for split, dataset in rows.items()
            }

    @property
    def label_names(self) -> tuple[str, ...]:
        """The class names by class id: sorted string labels, a ClassLabel's names, or ``"0"``, ``"1"``, ..."""
        self.setup()
        return self._label_names

    @property
    def num_train_samples(self) -> int:
        """Size of the training split: the range of training indices."""
        self.setup()
        return len(self.splits["train"])

    def _loader(self, split: str, shuffle: bool, num_workers: int) -> DataLoader:
        self.setup()
        if split not in self.splits:
            where = f"data.path={self.path} has no {split} split" if self.path else f"{_FILE_KEYS[split]} is not set"
            raise ConfigError(f"the {split} split is needed, but {where}; the validation data can serve as test data")
        collators = {prefix: DataCollatorWithPadding(t, return_tensors="pt") for prefix, t in self.tokenizers().items()}
        return DataLoader(
            self.splits[split],
            batch_size=self.batch_size,
            shuffle=shuffle,
            collate_fn=PadBatch(collators, self.return_index),
            num_workers=num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False, num_workers=self.num_workers)

    # --- contract ----------------------------------------------------------------------------------------

    def content_identity(self) -> dict[str, Any]:
        """What determines every split's inputs: the sources' sha256 digests (a directory's over its files'
        relative paths and contents, so not where they sit), the columns, ``max_length``, the validation
        split's ``val_fraction`` / ``split_seed``, and each tokenizer's identity; not batch size or workers."""
        sources = {
            name: {"format": kind, "sha256": directory_digest(path) if kind == "hf" else file_digest(path)}
            for name, (_, path, kind) in self._sources().items()
        }
        return {
            "dataset": "text",
            "sources": sources,
            **self._tokenization_identity(),
            "val_fraction": self.val_fraction,
            "split_seed": self.split_seed,
            "transfer_samples": self.transfer_samples,
        }

    def ordered_dataloader(self, split: str) -> DataLoader:
        """``split`` in index order, unshuffled, in the main process (for per-sample teacher outputs)."""
        return self._loader(split, shuffle=False, num_workers=0)

    def example_input(self) -> dict[str, Tensor]:
        """A batch of (up to) two validation rows, padded, for shape checks before training."""
        self.setup()
        split = self.splits["val"]
        x, *_ = self.ordered_dataloader("val").collate_fn([split[i] for i in range(min(2, len(split)))])
        return x


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
                {name.removeprefix(prefix): ids for name, ids in encodings.items() if _owner(name) == prefix}
                for encodings, _, _ in rows
            ]
            x |= {prefix + name: tensor for name, tensor in collator(features).items()}
        y = torch.tensor([label for _, label, _ in rows], dtype=torch.long)
        if self.return_index:
            return x, y, torch.tensor([index for _, _, index in rows], dtype=torch.long)
        return x, y


@contextmanager
def quiet_datasets() -> Iterator[None]:
    """``datasets``' per-split progress bars off while the splits are read and tokenised (restored after)."""
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def _listing(names: Sequence[str], shown: int = 10) -> str:
    """The first ``shown`` of ``names``, comma-separated."""
    return ", ".join(names[:shown]) + (", ..." if len(names) > shown else "")


def _owner(name: str) -> str:
    """The prefix of the tokenizer that made the batch key ``name``."""
    return TEACHER_PREFIX if name.startswith(TEACHER_PREFIX) else ""


def _read(key: str, path: Path, kind: str) -> datasets.Dataset | datasets.DatasetDict:
    """One source's rows, in memory: the loader's own files go to a temporary directory, not ~/.cache."""
    try:
        if kind == "hf":
            return datasets.load_from_disk(str(path), keep_in_memory=True)
        with tempfile.TemporaryDirectory(prefix="kd-text-") as cache:
            return datasets.load_dataset(
                "csv" if kind == "csv" else "json",
                data_files=str(path),
                split="train",
                keep_in_memory=True,
                cache_dir=cache,
            )
    except (FileNotFoundError, datasets.exceptions.DatasetGenerationError) as error:
        reason = error.__cause__ or error
        raise ConfigError(f"{key}={path} could not be read as {kind} ({reason})") from None


def _load_tokenizer(key: str, value: str | Path | None) -> PreTrainedTokenizerBase:
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


def directory_digest(path: Path) -> str:
    """sha256 over a saved dataset directory's files (relative paths and contents), leaving out each split's
    ``state.json``, whose fingerprint differs between saves of the same rows."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file() and p.name != "state.json"):
        digest.update(f"{file.relative_to(path).as_posix()}\0{file_digest(file)}\n".encode())
    return digest.hexdigest()
