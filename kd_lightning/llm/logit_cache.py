"""A disk cache of a teacher's top-k next-token log-probabilities, so training need not run the teacher.

For every valid token (see :func:`~kd_lightning.llm.token_loss.next_token_targets`) of every example
the cache stores, once at temperature 1, the teacher's ``top_k`` token ids and log-probabilities, the log
of the remaining mass and the Rényi entropies of that remainder, compactly (format 3,
:mod:`~kd_lightning.llm.cache_codec`: 150 bytes per token at ``k = 64`` and a 49,152-token vocabulary).
Reads re-temper the rows to the loss's temperature, so the loss compares student and teacher over
``k + 1`` buckets (:class:`~kd_lightning.llm.token_loss.SparseTeacher`) at any temperature from one cache.

Layout of ``<root>/<key>/``: one ``.npy`` per array of :data:`~kd_lightning.llm.cache_codec.ARRAYS`,
``index.json`` (example key -> first row, row count) and ``meta.json`` (what the cache was built from
and the sha256 and shape of each array file, see :mod:`~kd_lightning.engine.caching.store`). ``key``
hashes the teacher's weights, the examples, ``top_k``, the vocabulary size and the codec (not the
temperature), so changing any of them builds a new cache. Examples are keyed by their content (attended
tokens and labels), so shuffled or differently padded batches find their rows, and an example the cache
does not hold is an error, not a silent miss. A cache is written into a temporary directory (each array
file allocated at its full size first, written with ``pwrite``: a full disk is one :class:`ConfigError`
and no temporary files) and renamed into place, so parallel jobs never read a half-written one; opening a
cache checks its metadata, array shapes and digests. A format-2 cache (tempered rows, temperature in the
key) is still found and read, at its own temperature only.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from kd_lightning.engine.caching.store import array_record, cache_key, open_array, publish_directory, weights_digest
from kd_lightning.engine.errors import ConfigError
from kd_lightning.llm.cache_codec import GAMMA, LEVELS, TAIL_EXPONENTS, RowWriter, TopKCodec, tail_statistics
from kd_lightning.llm.teacher_rows import RemoteScorer, example_keys, stack_columns, teacher_log_probs
from kd_lightning.llm.tokens import SparseTeacher

log = logging.getLogger(__name__)

#: Bumped when the on-disk layout changes; a new format is built under a new key.
FORMAT_VERSION = 3
#: Format 2: int32 ids, float16 log-probs and float32 tail at the loss temperature (in its key); still read.
_V2 = 2
_V2_ARRAYS = ("ids", "log_probs", "tail")
_TAIL_MASS_ONLY = (
    "a remote teacher's logit cache holds its top-k and tail mass at T=1 only, not the tail's power sums that "
    "re-tempering needs"
)
_SCORED = ("input_ids", "attention_mask", "labels")
Batch = Mapping[str, Tensor]


class LogitCache:
    """Reads a cache directory written by :meth:`build` at ``temperature`` (None: the temperature it is stored
    at, 1 for format 3); ``expected`` metadata (teacher digest, ``top_k``, ``vocab_size``...) must match, and
    the arrays must match their recorded shapes and digests (``verify``), else a :class:`ConfigError`. A
    format-2 cache (stored at the loss temperature of its run) still reads, at that temperature only."""

    def __init__(
        self,
        path: str | Path,
        expected: Mapping[str, Any] | None = None,
        verify: bool = True,
        temperature: float | None = None,
    ) -> None:
        self.path = Path(path)
        meta_file = self.path / "meta.json"
        if not meta_file.is_file():
            raise ConfigError(
                f"no logit cache at {self.path} (meta.json missing); rebuild it (llm/teacher_cache=top_k)"
            )
        self.meta: dict[str, Any] = json.loads(meta_file.read_text())
        if self.meta.get("format_version") not in (_V2, FORMAT_VERSION):
            raise ConfigError(
                f"logit cache {self.path} has format {self.meta.get('format_version')}, not {_V2} or "
                f"{FORMAT_VERSION}; delete it to rebuild"
            )
        differing = [name for name, value in (expected or {}).items() if self.meta.get(name) != value]
        if differing:
            detail = ", ".join(f"{name}: cache {self.meta.get(name)} != wanted {expected[name]}" for name in differing)
            raise ConfigError(f"logit cache {self.path} was built for other settings ({detail}); delete it to rebuild")
        num_tokens, top_k = self.meta["num_tokens"], self.meta["top_k"]
        if self.legacy:
            shapes = {"ids": (num_tokens, top_k), "log_probs": (num_tokens, top_k), "tail": (num_tokens,)}
        else:
            self.codec = TopKCodec(top_k, self.vocab_size, tuple(self.meta["tail_exponents"]))
            shapes = {name: shape for name, (shape, _) in self.codec.layout(num_tokens).items()}
        self.arrays: dict[str, np.ndarray] = {}
        for name, shape in shapes.items():
            file = self.path / f"{name}.npy"
            array = open_array(file, self.meta["files"][name], verify)
            if array is None:
                raise ConfigError(f"logit cache file {file} is missing or corrupt (digest mismatch); delete the cache")
            if array.shape != shape:
                raise ConfigError(
                    f"logit cache file {file} has shape {array.shape}, meta.json says {shape}; delete the cache"
                )
            self.arrays[name] = array
        self.index: dict[str, list[int]] = json.loads((self.path / "index.json").read_text())
        self.read_at(self.stored_temperature if temperature is None else temperature)

    @property
    def legacy(self) -> bool:
        """Format 2: rows stored at one temperature (``meta.json``'s), readable at that temperature only."""
        return self.meta["format_version"] == _V2

    @property
    def top_k(self) -> int:
        return int(self.meta["top_k"])

    @property
    def stored_temperature(self) -> float:
        return float(self.meta["temperature"]) if self.legacy else 1.0

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    def read_at(self, temperature: float) -> None:
        """Serve :meth:`lookup` rows at ``temperature`` from now on (re-tempered from T = 1, see
        :mod:`~kd_lightning.llm.cache_codec`); a :class:`ConfigError` if this cache cannot."""
        self.check_temperature(temperature)
        self.temperature = float(temperature)

    def check_temperature(self, temperature: float) -> None:
        """A :class:`ConfigError` unless this cache can serve rows at ``temperature``."""
        if self.legacy and temperature != self.stored_temperature:
            raise ConfigError(
                f"the logit cache {self.path} (format 2) holds teacher log-probs at T={self.stored_temperature}, "
                f"not llm.loss.divergence.temperature={temperature}; delete it to rebuild it in format 3, which "
                "re-tempers"
            )
        if not self.legacy and temperature != 1.0 and not self.codec.exponents:
            raise ConfigError(
                f"the logit cache {self.path}: {_TAIL_MASS_ONLY}; it cannot be read at "
                f"llm.loss.divergence.temperature={temperature}: set it to 1"
            )

    def lookup(self, batch: Batch, temperature: float | None = None) -> SparseTeacher:
        """The cached teacher rows for every valid token of ``batch``, in loss order, on the batch's device, at
        ``temperature`` (None: the one given by :meth:`read_at`)."""
        temperature = self.temperature if temperature is None else float(temperature)
        self.check_temperature(temperature)
        rows = []
        for key, count in example_keys(batch):
            entry = self.index.get(key)
            if entry is None or entry[1] != count:
                raise ConfigError(
                    f"a batch example is not in the logit cache {self.path} (built for other data?); "
                    "rebuild it for this llm.data (delete the directory)"
                )
            rows.append(np.arange(entry[0], entry[0] + count))
        rows = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
        device = batch["input_ids"].device
        selected = {name: np.asarray(array[rows]) for name, array in self.arrays.items()}
        if self.legacy:
            top = SparseTeacher(*(torch.from_numpy(selected[name]) for name in _V2_ARRAYS))
        else:
            top = self.codec.decode(selected, temperature)
        return SparseTeacher(top.ids.long().to(device), top.log_probs.float().to(device), top.tail.float().to(device))

    @classmethod
    def build(
        cls,
        teacher: nn.Module | RemoteScorer,
        loaders: Iterable[Iterable[Batch]],
        root: str | Path,
        top_k: int,
        temperature: float,
        vocab_size: int,
        verify: bool = True,
    ) -> LogitCache:
        """The cache of ``teacher`` over every batch of ``loaders`` under ``root``, read at ``temperature``:
        opened if one with the same key exists, else computed at T = 1 (the teacher runs once per distinct
        example) and written atomically. The key leaves the temperature out, so a temperature sweep shares one
        cache. ``teacher`` is a causal LM, or a remote scorer (:class:`~kd_lightning.llm.remote.RemoteTeacher`:
        an ``identity`` and ``top_k_batch(batch, top_k, temperature, vocab_size)``), whose cache stores the
        tail mass only and reads at T = 1 only."""
        if not 1 <= top_k < vocab_size:
            raise ConfigError(f"llm.teacher_cache.top_k={top_k} must be in [1, vocab size {vocab_size})")
        if isinstance(teacher, nn.Module):
            teacher.eval()
            identity, device, exponents = weights_digest(teacher), next(teacher.parameters()).device, TAIL_EXPONENTS

            def score(batch: Batch) -> list[Tensor]:
                parts = []
                for log_probs in teacher_log_probs(teacher, batch, vocab_size):
                    top, ids = log_probs.topk(top_k, dim=-1)
                    parts.append((ids, top, *tail_statistics(log_probs, ids, exponents)))
                return stack_columns(parts, top_k, 4)
        else:
            identity, device, exponents = teacher.identity, torch.device("cpu"), ()
            if temperature != 1.0:
                raise ConfigError(f"llm.loss.divergence.temperature={temperature}: {_TAIL_MASS_ONLY}; set it to 1")

            def score(batch: Batch) -> list[Tensor]:
                top = teacher.top_k_batch(batch, top_k, 1.0, vocab_size)
                return [*top, top.tail.new_zeros((top.tail.shape[0], 0))]

        loaders = [list(loader) for loader in loaders]
        layout: dict[str, list[int]] = {}  # example key -> [first row, rows]
        num_tokens = 0
        for batch in (batch for loader in loaders for batch in loader):
            for key, count in example_keys(batch):
                if key not in layout:
                    layout[key] = [num_tokens, count]
                    num_tokens += count
        codec = TopKCodec(top_k, vocab_size, exponents)
        settings = {
            "format_version": FORMAT_VERSION,
            "teacher": identity,
            "top_k": top_k,
            "vocab_size": vocab_size,
            "tail_exponents": list(exponents),
            "levels": LEVELS,
            "gamma": GAMMA,
        }
        path = Path(root) / cache_key(data=sorted(layout.items()), **settings)
        old = {"format_version": _V2, "teacher": identity, "top_k": top_k, "vocab_size": vocab_size}
        legacy = Path(root) / cache_key(data=sorted(layout.items()), temperature=float(temperature), **old)
        for found in (path, legacy):
            if (found / "meta.json").is_file():
                try:
                    cache = cls(found, {"teacher": identity, "top_k": top_k}, verify)
                except (ConfigError, ValueError, KeyError) as error:  # damaged: rebuilt below
                    log.warning("teacher logit cache %s is damaged (%s); rebuilding it", found, error)
                    shutil.rmtree(found, ignore_errors=True)
                    continue
                if cache.legacy:
                    log.warning("teacher logit cache %s is in format 2: read at T=%s only", found, temperature)
                cache.read_at(temperature)
                return cache
        tmp = Path(root) / f".tmp-{path.name}-{os.getpid()}-{time.time_ns()}"
        try:
            tmp.mkdir(parents=True)
            with contextlib.ExitStack() as stack:
                files = {}
                for name, (shape, dtype) in codec.layout(num_tokens).items():
                    files[name] = RowWriter(tmp / f"{name}.npy", shape, dtype)
                    stack.callback(files[name].close)
                written: set[str] = set()
                for batch in (batch for loader in loaders for batch in loader):
                    keys = example_keys(batch)
                    if all(key in written for key, _ in keys):
                        continue
                    batch = {name: batch[name].to(device) for name in (*_SCORED, "position_ids") if name in batch}
                    encoded = codec.encode(*score(batch))
                    first = 0
                    for key, count in keys:
                        start = layout[key][0]
                        if key not in written:
                            for name, rows in encoded.items():
                                files[name].write(start, rows[first : first + count])
                            written.add(key)
                        first += count
            records = {name: array_record(tmp / f"{name}.npy") for name in files}
            (tmp / "index.json").write_text(json.dumps(layout))
            meta = {**settings, "num_tokens": num_tokens, "files": records}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        except BaseException as error:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
                free = shutil.disk_usage(root).free
                raise ConfigError(
                    f"no space left for the teacher logit cache under llm.teacher_cache.directory={root}: it needs "
                    f"{codec.bytes_per_token() * num_tokens / 2**20:.1f} MiB, {free / 2**20:.1f} MiB are free; free "
                    "space there or point llm.teacher_cache.directory to another disk"
                ) from None
            raise
        publish_directory(tmp, path)
        return cls(path, settings, verify, temperature)
