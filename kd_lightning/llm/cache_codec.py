"""Format 3 of the teacher logit cache: compact top-k rows stored once at temperature 1, re-tempered on read.

Per valid token, for a teacher distribution :math:`p` over ``V`` tokens and its top-k ids
:math:`i_1..i_k` (log-probs sorted, :math:`r_j = \\log p_{i_j} - \\log p_{i_1} \\le 0`):

- ``ids``: the k ids in rank order, 2 bytes each when ``V <= 2**16``, 3 when ``V <= 2**24``, else 4.
- ``levels``: :math:`q_j = \\mathrm{round}(L\\,e^{\\gamma r_j})` (``L`` = :data:`LEVELS`, :math:`\\gamma` =
  :data:`GAMMA`), non-increasing in rank from :math:`q_1 = L`, written as a unary code of the drops
  :math:`q_{j-1} - q_j` (zeros, then a one per rank): at most ``k - 1 + L`` bits. :math:`p^\\gamma` is a
  companding curve: a uniform step in it is a small relative error for likely tokens and a large one for
  unlikely tokens, whose share of the KL is small. :math:`q = 0` decodes as :math:`q = 1/4`.
- ``tail``: :math:`g(1) = \\log \\sum_{j \\notin \\text{top-k}} p_j` as float16 (the top-1 log-prob is not
  stored: it follows from :math:`\\sum_{top-k} p + e^{g(1)} = 1`).
- ``entropy``: the Rényi entropies :math:`H_s` of the normalised tail at :data:`TAIL_EXPONENTS`, as a
  fraction of :math:`\\log(V - k)` in 8 bits (none for a teacher that reports the tail mass only).

Re-tempering at ``T`` (:math:`s = 1/T`): :math:`\\log p_T(i) = s \\log p_i - \\log Z_T` over the top-k and a
tail bucket :math:`g(s) = \\log \\sum_{tail} p_j^s = s\\,g(1) + (1 - s) H_s` (the definition of :math:`H_s`),
:math:`Z_T` normalising the ``k + 1`` buckets. :math:`H_s` is interpolated by a monotone cubic in ``s``
through :math:`H_0 = \\log(V - k)` and the stored exponents, and held at its last stored value beyond
(``T < 1/2``): exact at the stored exponents up to the 8-bit rounding. At ``k = 64``, ``V = 49152``: 128 + 16 + 2 + 4 =
150 bytes per token (format 2: 388).
"""

from __future__ import annotations

import errno
import io
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from kd_lightning.engine.errors import ConfigError
from kd_lightning.llm.tokens import SparseTeacher

#: Exponents s at which the tail's Rényi entropy is stored (T = 4, 2, 1, 1/2).
TAIL_EXPONENTS = (0.25, 0.5, 1.0, 2.0)
#: Quantisation levels of the companded top-k probabilities (see the module docstring).
LEVELS = 64
#: Companding exponent: the level of a top-k entry is round(LEVELS * (p / p_top1) ** GAMMA).
GAMMA = 0.15
#: Array names of a format-3 cache.
ARRAYS = ("ids", "levels", "tail", "entropy")


def tail_statistics(log_probs: Tensor, ids: Tensor, exponents: tuple[float, ...]) -> tuple[Tensor, Tensor]:
    """``(g(1) [N], H [N, len(exponents)])`` of full log-probabilities ``[N, V]`` outside ``ids`` ``[N, k]``:
    the log tail mass and the Rényi entropies :math:`H_s = (\\log \\sum q^s) / (1 - s)` of the tail
    normalised to :math:`q` (:math:`H_1 = -\\sum q \\log q`)."""
    tail = log_probs.float().scatter(1, ids, float("-inf"))
    mass = torch.logsumexp(tail, dim=-1)
    q_log = tail - mass.unsqueeze(1)
    columns = []
    for s in exponents:
        if s == 1.0:
            columns.append(-(q_log.exp() * q_log.nan_to_num(neginf=0.0)).sum(-1))
        else:
            columns.append(torch.logsumexp(q_log * s, dim=-1) / (1.0 - s))
    entropy = torch.stack(columns, -1) if columns else mass.new_zeros((mass.shape[0], 0))
    return mass.float(), entropy.float()


@dataclass(frozen=True)
class TopKCodec:
    """Encodes top-k rows at T = 1 into the arrays of :data:`ARRAYS` and decodes them at any temperature."""

    top_k: int
    vocab_size: int
    exponents: tuple[float, ...] = TAIL_EXPONENTS

    @property
    def id_bytes(self) -> int:
        return 2 if self.vocab_size <= 1 << 16 else 3 if self.vocab_size <= 1 << 24 else 4

    @property
    def level_bytes(self) -> int:
        return 0 if self.top_k == 1 else -(-(self.top_k - 1 + LEVELS) // 8)

    def layout(self, num_tokens: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """``{array: (shape, dtype)}`` of a cache of ``num_tokens`` rows."""
        return {
            "ids": ((num_tokens, self.top_k * self.id_bytes), np.dtype(np.uint8)),
            "levels": ((num_tokens, self.level_bytes), np.dtype(np.uint8)),
            "tail": ((num_tokens,), np.dtype(np.float16)),
            "entropy": ((num_tokens, len(self.exponents)), np.dtype(np.uint8)),
        }

    def bytes_per_token(self) -> int:
        return sum(dtype.itemsize * math.prod(shape[1:]) for shape, dtype in self.layout(1).values())

    def encode(self, ids: Tensor, log_probs: Tensor, tail: Tensor, entropy: Tensor) -> dict[str, np.ndarray]:
        """Arrays of rows ``ids`` ``[N, k]`` with ``log_probs`` ``[N, k]`` (sorted, descending) at T = 1, log tail
        mass ``tail`` ``[N]`` and tail Rényi entropies ``entropy`` ``[N, len(exponents)]``."""
        count, k = ids.shape
        raw = ids.cpu().numpy().astype("<u4").view(np.uint8).reshape(count, k, 4)[:, :, : self.id_bytes]
        relative = (log_probs - log_probs[:, :1]).double().cpu().clamp(max=0.0)
        levels = (relative * GAMMA).exp().mul(LEVELS).round().long().numpy()
        levels = np.minimum.accumulate(levels[:, 1:], axis=1) if k > 1 else levels[:, :0]  # ties stay sorted
        bits = np.zeros((count, self.level_bytes * 8), dtype=np.uint8)
        ones = np.arange(k - 1) + (LEVELS - levels)  # position of the one ending rank j's run of zeros
        np.put_along_axis(bits, ones, 1, axis=1)
        scale = math.log(self.vocab_size - self.top_k)
        fraction = (entropy.double().cpu().nan_to_num(0.0) / scale).clamp(0.0, 1.0).numpy()
        return {
            "ids": raw.reshape(count, -1).copy(),
            "levels": np.packbits(bits, axis=1),
            "tail": tail.cpu().float().numpy().astype(np.float16),
            "entropy": np.round(fraction * 255).astype(np.uint8),
        }

    def decode(self, arrays: dict[str, np.ndarray], temperature: float = 1.0) -> SparseTeacher:
        """The :class:`SparseTeacher` rows of ``arrays`` at ``temperature`` (``k + 1`` buckets summing to 1)."""
        if temperature != 1.0 and not self.exponents:
            raise ConfigError(
                "this logit cache holds the tail mass only (a remote teacher): it reads at temperature 1; "
                "set llm.loss.divergence.temperature=1"
            )
        count, k = arrays["ids"].shape[0], self.top_k
        raw = np.zeros((count, k, 4), dtype=np.uint8)
        raw[:, :, : self.id_bytes] = arrays["ids"].reshape(count, k, self.id_bytes)
        ids = torch.from_numpy(raw.view("<u4").reshape(count, k).astype(np.int64))
        bits = np.unpackbits(arrays["levels"], axis=1)
        _, ones = np.nonzero(bits)
        if len(ones) != count * (k - 1):
            raise ConfigError("a logit cache levels row is malformed (wrong number of ranks); delete the cache")
        levels = LEVELS - (ones.reshape(count, k - 1) - np.arange(k - 1))
        levels = np.concatenate([np.full((count, 1), LEVELS), levels], axis=1).astype(np.float64)
        relative = torch.from_numpy(np.log(np.where(levels == 0, 0.25, levels) / LEVELS) / GAMMA)
        log_tail = torch.from_numpy(arrays["tail"].astype(np.float64))
        top1 = torch.log1p(-log_tail.exp()) - torch.logsumexp(relative, dim=-1)
        log_probs, s = relative + top1.unsqueeze(1), 1.0 / temperature
        if s != 1.0:
            log_tail = s * log_tail + (1.0 - s) * self.tail_entropy(arrays["entropy"], s)
            norm = torch.logsumexp(torch.cat([log_probs * s, log_tail.unsqueeze(1)], 1), dim=-1, keepdim=True)
            log_probs, log_tail = log_probs * s - norm, log_tail - norm.squeeze(1)
        return SparseTeacher(ids, log_probs.float(), log_tail.float())

    def tail_entropy(self, stored: np.ndarray, s: float) -> Tensor:
        """:math:`H_s` of each row's tail: a monotone cubic (PCHIP, Fritsch & Carlson 1980; :math:`H_s` is
        non-increasing in ``s``) through :math:`H_0 = \\log(V - k)` and the stored exponents, held at the last
        stored value beyond them."""
        scale = math.log(self.vocab_size - self.top_k)
        knots = np.array([0.0, *self.exponents])
        values = np.concatenate([np.full((len(stored), 1), 1.0), stored / 255.0], axis=1) * scale
        if s >= knots[-1]:
            return torch.from_numpy(values[:, -1])
        return torch.from_numpy(monotone_cubic(knots, values, s))


def monotone_cubic(knots: np.ndarray, values: np.ndarray, x: float) -> np.ndarray:
    """Each row of ``values`` ``[N, K]`` at ``knots`` ``[K]`` interpolated at ``x`` by a piecewise cubic Hermite
    curve whose slopes (weighted harmonic means of the neighbouring secants, zero at a local extremum) keep
    it monotone wherever the data are: PCHIP (Fritsch & Carlson 1980)."""
    width = np.diff(knots)
    secant = np.diff(values, axis=1) / width
    slope = np.empty_like(values)
    slope[:, 0], slope[:, -1] = secant[:, 0], secant[:, -1]
    for i in range(1, len(knots) - 1):
        before, after = 2 * width[i] + width[i - 1], width[i] + 2 * width[i - 1]
        same = secant[:, i - 1] * secant[:, i] > 0
        harmonic = (before + after) / (
            before / np.where(same, secant[:, i - 1], 1) + after / np.where(same, secant[:, i], 1)
        )
        slope[:, i] = np.where(same, harmonic, 0.0)
    j = min(int(np.searchsorted(knots, x, side="right")) - 1, len(knots) - 2)
    t = (x - knots[j]) / width[j]
    return (
        (2 * t**3 - 3 * t**2 + 1) * values[:, j]
        + (t**3 - 2 * t**2 + t) * width[j] * slope[:, j]
        + (-2 * t**3 + 3 * t**2) * values[:, j + 1]
        + (t**3 - t**2) * width[j] * slope[:, j + 1]
    )


class RowWriter:
    """One ``.npy`` array written row block by row block with ``os.pwrite``, not through a memory map: the file
    gets its full size up front (``os.posix_fallocate``), so a full disk is an ``OSError`` (ENOSPC) when it
    is created, never a bus error on a later write to an unbacked page."""

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: np.dtype) -> None:
        header = io.BytesIO()
        descr = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
        np.lib.format.write_array_header_1_0(header, descr)
        self.offset, self.row_bytes = len(header.getvalue()), dtype.itemsize * math.prod(shape[1:])
        self.dtype = dtype
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(self.fd, header.getvalue())
            if shape[0] * self.row_bytes:
                reserve(self.fd, self.offset + shape[0] * self.row_bytes)
        except OSError:
            os.close(self.fd)
            raise

    def write(self, start: int, rows: np.ndarray) -> None:
        """Rows ``start ..`` of the array."""
        data = np.ascontiguousarray(rows, dtype=self.dtype).tobytes()
        if data and os.pwrite(self.fd, data, self.offset + start * self.row_bytes) != len(data):
            raise OSError(errno.ENOSPC, "short write")

    def close(self) -> None:
        os.close(self.fd)


def reserve(fd: int, size: int) -> None:
    """Allocate ``size`` bytes of the file ``fd`` on disk (a file system without ``posix_fallocate``: only
    extend it, and a full disk shows as ``ENOSPC`` on a write)."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as error:
        if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
        os.ftruncate(fd, size)
