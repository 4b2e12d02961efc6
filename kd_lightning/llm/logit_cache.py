"""A disk cache of a teacher's top-k next-token log-probabilities, so training need not run the teacher.

For every valid token (see :func:`~kd_lightning.llm.token_loss.next_token_targets`) of every example
the cache stores the teacher's ``top_k`` token ids (int32), their log-probabilities (float16) and the
log of the remaining probability mass (float32, computed exactly as a log-sum-exp), all at the loss's
temperature. The loss then compares student and teacher over ``k + 1`` buckets
(:class:`~kd_lightning.llm.token_loss.SparseTeacher`).

Layout of ``<root>/<key>/``: ``ids.npy`` ``[N, k]``, ``log_probs.npy`` ``[N, k]``, ``tail.npy`` ``[N]``,
``index.json`` (example key -> first row, row count) and ``meta.json`` (what the cache was built from
and the sha256 and shape of each array file, see :mod:`~kd_lightning.engine.caching.store`). ``key``
hashes the teacher's weights, the examples, ``top_k``, the temperature and the vocabulary size, so
changing any of them builds a new cache. Examples are keyed by their content (attended tokens and
labels), so shuffled or differently padded batches find their rows, and an example the cache does not
hold is an error, not a silent miss. A cache is written into a temporary directory and renamed into
place, so parallel jobs never read a half-written one; opening a cache checks its metadata, array shapes
and digests.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.engine.caching.store import array_record, cache_key, open_array, publish_directory, weights_digest
from kd_lightning.engine.errors import ConfigError
from kd_lightning.llm.token_loss import (
    IGNORE_INDEX,
    SparseTeacher,
    bucket_log_probs,
    final_hidden_states,
    linear_head,
    next_token_targets,
)

log = logging.getLogger(__name__)

#: Bumped when the on-disk layout changes; older caches are then rebuilt under a new key.
FORMAT_VERSION = 2
_ARRAYS = ("ids", "log_probs", "tail")
Batch = Mapping[str, Tensor]


class RemoteScorer(Protocol):
    """A teacher that is not a module: named by ``identity``, scoring batches into top-k rows."""

    identity: str

    def top_k_batch(self, batch: Batch, top_k: int, temperature: float, vocab_size: int) -> SparseTeacher: ...


def example_keys(batch: Batch) -> list[tuple[str, int]]:
    """``(key, valid tokens)`` per row: the key hashes the row's attended tokens and their labels, so it
    does not depend on padding side, batch composition or order."""
    mask = batch["attention_mask"].bool().cpu()
    ids, labels = batch["input_ids"].cpu(), batch["labels"].cpu()
    keys = []
    for row in range(ids.shape[0]):
        tokens, targets = ids[row][mask[row]], labels[row][mask[row]]
        digest = hashlib.blake2b(tokens.numpy().astype(np.int64).tobytes(), digest_size=16)
        digest.update(targets.numpy().astype(np.int64).tobytes())
        keys.append((digest.hexdigest(), int((targets[1:] != IGNORE_INDEX).sum())))
    return keys


@torch.no_grad()
def teacher_top_k(
    teacher: nn.Module, batch: Batch, top_k: int, temperature: float, vocab_size: int, chunk_size: int = 512
) -> SparseTeacher:
    """The teacher's top-k log-probabilities of ``softmax(logits[:vocab_size] / T)`` and tail per valid token."""
    hidden = final_hidden_states(teacher, batch["input_ids"], batch["attention_mask"])
    _, positions = next_token_targets(batch["labels"])
    hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)
    weight, bias = linear_head(teacher.get_output_embeddings(), "llm.teacher.model")
    if vocab_size < weight.shape[0]:
        weight, bias = weight[:vocab_size], None if bias is None else bias[:vocab_size]
    parts = []
    for chunk in hidden.split(chunk_size):
        log_probs = F.log_softmax(F.linear(chunk.to(weight.dtype), weight, bias).float() / temperature, dim=-1)
        top, ids = log_probs.topk(top_k, dim=-1)
        parts.append((ids, top, bucket_log_probs(log_probs, ids)[:, -1]))
    if not parts:
        empty = hidden.new_zeros((0, top_k))
        return SparseTeacher(empty.long(), empty.float(), empty.new_zeros(0).float())
    return SparseTeacher(*(torch.cat(column) for column in zip(*parts, strict=True)))


class LogitCache:
    """Reads a cache directory written by :meth:`build`; ``expected`` metadata (teacher digest, ``top_k``,
    ``temperature``, ``vocab_size``...) must match, and the arrays must match their recorded shapes and
    digests (``verify``), else a :class:`ConfigError`."""

    def __init__(self, path: str | Path, expected: Mapping[str, Any] | None = None, verify: bool = True) -> None:
        self.path = Path(path)
        meta_file = self.path / "meta.json"
        if not meta_file.is_file():
            raise ConfigError(
                f"no logit cache at {self.path} (meta.json missing); rebuild it (llm/teacher_cache=top_k)"
            )
        self.meta: dict[str, Any] = json.loads(meta_file.read_text())
        wanted = {"format_version": FORMAT_VERSION, **(expected or {})}
        differing = [name for name, value in wanted.items() if self.meta.get(name) != value]
        if differing:
            detail = ", ".join(f"{name}: cache {self.meta.get(name)} != wanted {wanted[name]}" for name in differing)
            raise ConfigError(f"logit cache {self.path} was built for other settings ({detail}); delete it to rebuild")
        num_tokens, top_k = self.meta["num_tokens"], self.meta["top_k"]
        shapes = {"ids": (num_tokens, top_k), "log_probs": (num_tokens, top_k), "tail": (num_tokens,)}
        self.arrays: dict[str, np.ndarray] = {}
        for name in _ARRAYS:
            file = self.path / f"{name}.npy"
            array = open_array(file, self.meta["files"][name], verify)
            if array is None:
                raise ConfigError(f"logit cache file {file} is missing or corrupt (digest mismatch); delete the cache")
            if array.shape != shapes[name]:
                raise ConfigError(
                    f"logit cache file {file} has shape {array.shape}, meta.json says {shapes[name]}; delete the cache"
                )
            self.arrays[name] = array
        self.index: dict[str, list[int]] = json.loads((self.path / "index.json").read_text())

    @property
    def top_k(self) -> int:
        return int(self.meta["top_k"])

    @property
    def temperature(self) -> float:
        return float(self.meta["temperature"])

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    def lookup(self, batch: Batch) -> SparseTeacher:
        """The cached teacher rows for every valid token of ``batch``, in loss order, on the batch's device."""
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
        ids, log_probs, tail = (torch.from_numpy(np.asarray(self.arrays[name][rows])) for name in _ARRAYS)
        return SparseTeacher(ids.long().to(device), log_probs.float().to(device), tail.float().to(device))

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
        """The cache of ``teacher`` over every batch of ``loaders`` under ``root``: opened if one with the same
        key exists, else computed (the teacher runs once per distinct example) and written atomically.
        ``teacher`` is a causal LM, or a remote scorer (:class:`~kd_lightning.llm.remote.RemoteTeacher`:
        an ``identity`` and ``top_k_batch(batch, top_k, temperature, vocab_size)``)."""
        if not 1 <= top_k < vocab_size:
            raise ConfigError(f"llm.teacher_cache.top_k={top_k} must be in [1, vocab size {vocab_size})")
        if isinstance(teacher, nn.Module):
            teacher.eval()
            identity, device = weights_digest(teacher), next(teacher.parameters()).device

            def score(batch: Batch) -> SparseTeacher:
                return teacher_top_k(teacher, batch, top_k, temperature, vocab_size)
        else:
            identity, device = teacher.identity, torch.device("cpu")

            def score(batch: Batch) -> SparseTeacher:
                return teacher.top_k_batch(batch, top_k, temperature, vocab_size)

        loaders = [list(loader) for loader in loaders]
        layout: dict[str, list[int]] = {}  # example key -> [first row, rows]
        num_tokens = 0
        for batch in (batch for loader in loaders for batch in loader):
            for key, count in example_keys(batch):
                if key not in layout:
                    layout[key] = [num_tokens, count]
                    num_tokens += count
        settings = {
            "format_version": FORMAT_VERSION,
            "teacher": identity,
            "top_k": top_k,
            "temperature": float(temperature),
            "vocab_size": vocab_size,
        }
        path = Path(root) / cache_key(data=sorted(layout.items()), **settings)
        if (path / "meta.json").is_file():
            try:
                return cls(path, settings, verify)
            except (ConfigError, ValueError, KeyError) as error:  # damaged: rebuilt below
                log.warning("teacher logit cache %s is damaged (%s); rebuilding it", path, error)
                shutil.rmtree(path, ignore_errors=True)
        tmp = Path(root) / f".tmp-{path.name}-{os.getpid()}-{time.time_ns()}"
        tmp.mkdir(parents=True)
        files = {
            "ids": np.lib.format.open_memmap(tmp / "ids.npy", "w+", np.int32, (num_tokens, top_k)),
            "log_probs": np.lib.format.open_memmap(tmp / "log_probs.npy", "w+", np.float16, (num_tokens, top_k)),
            "tail": np.lib.format.open_memmap(tmp / "tail.npy", "w+", np.float32, (num_tokens,)),
        }
        written: set[str] = set()
        for batch in (batch for loader in loaders for batch in loader):
            keys = example_keys(batch)
            if all(key in written for key, _ in keys):
                continue
            batch = {name: batch[name].to(device) for name in ("input_ids", "attention_mask", "labels")}
            top = score(batch)
            first = 0
            for key, count in keys:
                start = layout[key][0]
                if key not in written:
                    for name, column in zip(_ARRAYS, top, strict=True):
                        files[name][start : start + count] = column[first : first + count].cpu().numpy()
                    written.add(key)
                first += count
        for array in files.values():
            array.flush()
        del files
        records = {name: array_record(tmp / f"{name}.npy") for name in _ARRAYS}
        (tmp / "index.json").write_text(json.dumps(layout))
        (tmp / "meta.json").write_text(json.dumps({**settings, "num_tokens": num_tokens, "files": records}, indent=2))
        publish_directory(tmp, path)
        return cls(path, settings, verify)
