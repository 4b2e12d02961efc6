"""Where a text dataset's rows come from (:class:`~kd_lightning.data.text.TextClassificationDataModule`): CSV or
JSON Lines files, or directories saved with ``datasets``' ``save_to_disk``, read into memory and checked to hold
the configured columns; nothing is downloaded."""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import datasets

from kd_lightning.engine.caching.store import file_digest
from kd_lightning.engine.errors import ConfigError

FORMATS = ("auto", "csv", "jsonl", "hf")
_SUFFIX_FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl"}
#: The split names a saved DatasetDict may use for each split.
_DICT_SPLITS = {"train": ("train",), "val": ("validation", "val"), "test": ("test",)}
#: The config key of each split's file.
FILE_KEYS = {"train": "data.train_file", "val": "data.val_file", "test": "data.test_file"}


@dataclass(frozen=True)
class TextSource:
    """The configured sources and columns of a text dataset: ``files`` by split (``train`` / ``val`` /
    ``test``; None: not given), or ``path`` (a saved DatasetDict holding the splits), read as ``format``
    (``auto``: by suffix, a directory is ``hf``)."""

    files: Mapping[str, str | Path | None]
    path: str | Path | None
    format: str
    text_column: str
    text_pair_column: str | None
    label_column: str

    def layout(self) -> str:
        columns = [self.text_column, *([self.text_pair_column] if self.text_pair_column else []), self.label_column]
        return "columns " + " / ".join(columns)

    def sources(self) -> dict[str, tuple[str, Path, str]]:
        """The configured sources, checked to exist: ``{name: (key, path, format)}``, ``name`` a split
        (``train``, ``val``, ``test``) or ``path`` (a saved DatasetDict holding the splits)."""
        if self.path is not None:
            path = Path(self.path).expanduser()
            if not path.is_dir():
                raise ConfigError(
                    f"data.path={self.path} is not a directory; expected a DatasetDict saved with save_to_disk, "
                    f"with splits train / validation (or val) / test and {self.layout()}; nothing is downloaded"
                )
            return {"path": ("data.path", path, "hf")}
        if self.files["train"] is None:
            raise ConfigError(
                f"data.train_file is not set; give a CSV or JSON Lines file (or a save_to_disk directory) with "
                f"{self.layout()}, or set data.path to a saved DatasetDict"
            )
        return {
            split: (FILE_KEYS[split], *self.file_source(FILE_KEYS[split], value))
            for split, value in self.files.items()
            if value is not None
        }

    def file_source(self, key: str, value: str | Path) -> tuple[Path, str]:
        path = Path(value).expanduser()
        if not path.exists():
            raise ConfigError(
                f"{key}={value} does not exist; expected a CSV or JSON Lines file (or a directory saved with "
                f"datasets' save_to_disk) with {self.layout()}; nothing is downloaded"
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

    def read_splits(self) -> tuple[dict[str, datasets.Dataset], dict[str, str]]:
        """Every available split's rows, in memory, and where each came from (for error messages)."""
        sources = self.sources()
        if "path" in sources:
            key, path, _ = sources["path"]
            saved = read_source(key, path, "hf")
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
                dataset = read_source(key, path, kind)
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
                        f"{', '.join(dataset.column_names)}); expected {self.layout()}"
                    )
        return rows, origins


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


def listing(names: Sequence[str], shown: int = 10) -> str:
    """The first ``shown`` of ``names``, comma-separated."""
    return ", ".join(names[:shown]) + (", ..." if len(names) > shown else "")


def read_source(key: str, path: Path, kind: str) -> datasets.Dataset | datasets.DatasetDict:
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


def directory_digest(path: Path) -> str:
    """sha256 over a saved dataset directory's files (relative paths and contents), leaving out each split's
    ``state.json``, whose fingerprint differs between saves of the same rows."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file() and p.name != "state.json"):
        digest.update(f"{file.relative_to(path).as_posix()}\0{file_digest(file)}\n".encode())
    return digest.hexdigest()
