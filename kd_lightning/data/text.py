"""Text classification from local files (CSV, JSON Lines, or a ``save_to_disk`` directory), tokenised with
Hugging Face tokenizers saved on disk; nothing is ever downloaded.

Needs the optional ``datasets`` and ``transformers`` packages; :mod:`kd_lightning.data` imports this module
only when :class:`TextClassificationDataModule` is first used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from torch import Tensor
from torch.utils.data import DataLoader

from kd_lightning.data.contract import check_loader_options
from kd_lightning.engine.caching.store import file_digest
from kd_lightning.engine.errors import ConfigError, check_type

try:
    import datasets  # noqa: F401 - imported here for the one-line error below; the modules below use it
    from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase
except ModuleNotFoundError as missing:  # pragma: no cover - depends on the installed extras
    raise ModuleNotFoundError(
        f"kd_lightning.data.TextClassificationDataModule needs the `datasets` and `transformers` packages "
        f"({missing.name} is missing): pip install datasets transformers"
    ) from missing

from kd_lightning.data.text_batches import EncodedSplit, PadBatch
from kd_lightning.data.text_labels import encode_labels, limit_unlabelled, split_validation
from kd_lightning.data.text_sources import FILE_KEYS, FORMATS, TextSource, directory_digest, quiet_datasets
from kd_lightning.data.text_tokenize import TextTokenization

_PathValue = str | Path | None


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
        self.files = {"train": train_file, "val": val_file, "test": test_file}
        self.path = path
        self.format = format
        self.text_column = text_column
        self.text_pair_column = text_pair_column
        self.label_column = label_column
        self.source = TextSource(self.files, path, format, text_column, text_pair_column, label_column)
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
        self.tokenization = TextTokenization(
            tokenizer, teacher_tokenizer, text_column, text_pair_column, label_column, max_length
        )
        self._label_names: tuple[str, ...] = ()

    def tokenizers(self) -> dict[str, PreTrainedTokenizerBase]:
        """The tokenizers by the prefix of their keys in a batch (:meth:`TextTokenization.tokenizers`)."""
        return self.tokenization.tokenizers()

    # --- LightningDataModule -----------------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Check that the sources and tokenizers exist (nothing to download)."""
        self.source.sources()
        self.tokenizers()

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        self.tokenizers()
        with quiet_datasets():
            rows, origins = self.source.read_splits()
            labels, self._label_names = encode_labels(rows, origins, self.label_column, self.num_classes)
            limit_unlabelled(rows, labels, self.transfer_samples)
            if "val" not in rows:
                split_validation(rows, labels, self.val_fraction, self.split_seed)
                origins["val"] = f"{origins['train']} (data.val_fraction={self.val_fraction})"
            self.splits = {
                split: EncodedSplit(self.tokenization.encode_split(split, dataset, origins[split]), labels[split])
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
            where = f"data.path={self.path} has no {split} split" if self.path else f"{FILE_KEYS[split]} is not set"
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
            for name, (_, path, kind) in self.source.sources().items()
        }
        return {
            "dataset": "text",
            "sources": sources,
            **self.tokenization.identity(),
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
