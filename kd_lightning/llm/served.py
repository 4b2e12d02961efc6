"""A teacher behind a server scoring every training step (``llm/teacher=remote`` with ``llm/teacher_cache=none``).

Off-policy, the server scores each batch's prompt + response; on-policy, the student's sampled tokens. Each
example (one row, or one segment of a packed row) is one ``/v1/completions`` request of
:meth:`~kd_lightning.llm.remote.RemoteTeacher.top_k_batch` (its answer checks, retries, timeout and response
cache), run on a thread pool of ``concurrency`` threads.

Overlap: the training data loader hands each batch to :meth:`ServedTeacher.submit` when it reads it, ``prefetch``
batches before the step that trains on it (:class:`ReadAheadLoader`; Lightning itself reads one batch ahead),
so the server scores batch ``n + 1`` while the student trains on batch ``n``; :meth:`ServedTeacher.lookup`
then only waits for what is not back yet. A teacher that keeps up costs no wall time. Samples drawn in the
step (on-policy) cannot be known ahead: their requests go out in the step.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from kd_lightning.engine.errors import ConfigError, check_type
from kd_lightning.llm.packing import example_ranges
from kd_lightning.llm.teacher_rows import example_keys
from kd_lightning.llm.tokens import SparseTeacher

log = logging.getLogger(__name__)
Batch = Mapping[str, Any]
_SCORED = ("input_ids", "attention_mask", "labels")


def example_batches(batch: Batch) -> list[tuple[str, dict[str, Tensor]]]:
    """``(content key, one-example batch)`` per example of ``batch``, in loss order: each row with its attended
    tokens only (the server sees no padding)."""
    mask = batch["attention_mask"].bool().cpu()
    places = [(row, mask[row]) for row in range(mask.shape[0])]
    if "position_ids" in batch:  # packed rows (kd_lightning.llm.packing): one example per range
        places = [
            (row, torch.arange(mask.shape[1]).ge(start) & torch.arange(mask.shape[1]).lt(stop))
            for row, ranges in enumerate(example_ranges(batch["position_ids"], mask))
            for start, stop in ranges
        ]
    examples = []
    for (key, _), (row, keep) in zip(example_keys(batch), places, strict=True):
        examples.append((key, {name: batch[name][row].cpu()[keep].unsqueeze(0) for name in _SCORED}))
    return examples


class ServedTeacher:
    """Top-k teacher rows (:class:`~kd_lightning.llm.token_loss.SparseTeacher`) for every step, from a server.

    Args:
        remote: the :class:`~kd_lightning.llm.remote.RemoteTeacher` (``llm.teacher.model``).
        top_k: log-probabilities asked per position (``llm.teacher.top_k``; the rest is one tail bucket).
        temperature: the loss's; a server reports log-probabilities at T = 1, so it must be 1.
        vocab_size: the student's shared vocabulary (a returned id beyond it is refused).
        prefetch: batches the data loader reads ahead of training (``llm.teacher.prefetch``; 0: no overlap).
    """

    def __init__(self, remote: Any, top_k: int, temperature: float, vocab_size: int, prefetch: int = 2) -> None:
        check_type(top_k, int, "llm.teacher.top_k")
        check_type(prefetch, int, "llm.teacher.prefetch")
        if not 1 <= top_k < vocab_size:
            raise ConfigError(f"llm.teacher.top_k={top_k} must be in [1, vocabulary size {vocab_size})")
        if prefetch < 0:
            raise ConfigError(f"llm.teacher.prefetch={prefetch} must be >= 0 (batches read ahead; 0: none)")
        if temperature != 1.0:
            raise ConfigError(
                f"llm.loss.divergence.temperature={temperature}: a served teacher reports log-probabilities at "
                "temperature 1; set llm.loss.divergence.temperature=1"
            )
        self.remote, self.top_k, self.vocab_size, self.prefetch = remote, top_k, vocab_size, prefetch
        self.pool = ThreadPoolExecutor(max_workers=remote.concurrency, thread_name_prefix="served-teacher")
        #: example key -> its scoring in flight (or done, not yet read).
        self.pending: dict[str, Future[SparseTeacher]] = {}
        self.requests = 0

    @property
    def identity(self) -> str:
        """What names this teacher in checkpoints: the server and the model."""
        return str(self.remote.identity)

    def score(self, example: dict[str, Tensor]) -> SparseTeacher:
        """One example's rows, asked of the server (answer checked by the remote teacher)."""
        return self.remote.top_k_batch(example, self.top_k, 1.0, self.vocab_size)

    def submit(self, batch: Batch) -> list[str]:
        """Start scoring every example of ``batch`` not already asked for (returns at once); its example keys in
        loss order. A batch of prompts only (on-policy) has nothing to score yet."""
        if "input_ids" not in batch:
            return []
        keys = []
        for key, example in example_batches(batch):
            if key not in self.pending:
                self.pending[key] = self.pool.submit(self.score, example)
                self.requests += 1
            keys.append(key)
        return keys

    def lookup(self, batch: Batch) -> SparseTeacher:
        """The teacher rows of every valid token of ``batch`` (loss order, on its device): those read ahead
        when back, the others asked now. A failed request raises its one-line error here."""
        keys = self.submit(batch)
        rows = [self.pending[key] for key in keys]
        for key in set(keys):
            del self.pending[key]
        parts = [future.result() for future in rows]
        device = batch["input_ids"].device
        if not parts:
            empty = torch.zeros((0, self.top_k), device=device)
            return SparseTeacher(empty.long(), empty, empty.new_zeros(0))
        return SparseTeacher(*(torch.cat(column).to(device) for column in zip(*parts, strict=True)))

    def close(self) -> None:
        """Drop what was read ahead and not used; stop the threads."""
        for future in self.pending.values():
            future.cancel()
        self.pending.clear()
        self.pool.shutdown(wait=False, cancel_futures=True)


class ReadAheadLoader(DataLoader):
    """A :class:`~torch.utils.data.DataLoader` that hands every batch to ``read_ahead`` when it reads it,
    ``depth`` batches before yielding it (bounded: at most ``depth + 1`` batches held). Made with its
    ``__init__`` arguments, so Lightning can rebuild it (a distributed sampler) with the same hook."""

    def __init__(self, *args: Any, read_ahead: Callable[[Batch], object] | None = None, depth: int = 1, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.read_ahead, self.depth = read_ahead, depth

    def __iter__(self) -> Iterator[Any]:
        batches = super().__iter__()
        return batches if self.read_ahead is None else self._ahead(batches)

    def _ahead(self, batches: Iterator[Any]) -> Iterator[Any]:
        held: deque[Any] = deque()
        for batch in batches:
            self.read_ahead(batch)
            held.append(batch)
            if len(held) > self.depth:
                yield held.popleft()
        yield from held
