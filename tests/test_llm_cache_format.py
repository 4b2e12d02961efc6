"""Format 3 of the LM teacher logit cache (kd_lightning.llm.cache_codec): compact rows stored once at T = 1,
re-tempered on read (a temperature sweep reads one cache), format-2 caches still read, a full disk is one line."""

from __future__ import annotations

import errno
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor

from kd_lightning.engine.caching.store import array_record, cache_key, weights_digest
from kd_lightning.engine.errors import ConfigError
from kd_lightning.llm import cache_codec
from kd_lightning.llm.cache_codec import TopKCodec, tail_statistics
from kd_lightning.llm.divergences import ForwardKL
from kd_lightning.llm.logit_cache import LogitCache
from kd_lightning.llm.models import random_llama
from kd_lightning.llm.teacher_rows import example_keys, teacher_log_probs, teacher_top_k
from kd_lightning.llm.token_loss import TokenDistillationLoss
from kd_lightning.llm.tokens import SparseTeacher
from kd_lightning.methods.lm import TokenKD
from kd_lightning.methods.lm.heads import check_cache

VOCAB, TOP_K = 1000, 16


@pytest.fixture(scope="module")
def teacher() -> torch.nn.Module:
    """A tiny random Llama whose head is scaled up, so its next-token distributions are peaked like an LM's."""
    model = random_llama(vocab_size=VOCAB, seed=0).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(10.0)  # top-1 ~0.2, tail (k = 16 of 1000) ~0.7
    return model


def batches(count: int = 3, seed: int = 0) -> list[dict[str, Tensor]]:
    """Right-padded batches of 2 rows, every attended token after the first labelled."""
    generator, out = torch.Generator().manual_seed(seed), []
    for _ in range(count):
        ids = torch.randint(3, VOCAB, (2, 12), generator=generator)
        mask = torch.ones_like(ids)
        mask[1, 9:] = 0
        labels = ids.masked_fill(mask == 0, -100)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def buckets(top: SparseTeacher) -> Tensor:
    return torch.cat([top.log_probs, top.tail[:, None]], 1).double()


def bucket_kl(exact: SparseTeacher, decoded: SparseTeacher) -> Tensor:
    """Per-token KL(exact || decoded) over the k + 1 buckets (same ids in the same order)."""
    assert torch.equal(exact.ids, decoded.ids)
    p, q = buckets(exact), buckets(decoded)
    return (p.exp() * (p - q)).sum(-1)


@pytest.mark.parametrize(("vocab", "id_bytes"), [(1000, 2), (1 << 16, 2), (70_000, 3), ((1 << 24) + 5, 4)])
def test_ids_take_the_bytes_the_vocabulary_needs_and_round_trip(vocab: int, id_bytes: int) -> None:
    codec = TopKCodec(8, vocab)
    ids = torch.randint(0, vocab, (5, 8), generator=torch.Generator().manual_seed(0))
    ids[0, 0] = vocab - 1
    log_probs = torch.linspace(-1, -9, 8).expand(5, 8)
    tail = torch.full((5,), -3.0)
    arrays = codec.encode(ids, log_probs, tail, torch.zeros(5, 4))
    assert codec.id_bytes == id_bytes and arrays["ids"].shape == (5, 8 * id_bytes)
    assert torch.equal(codec.decode(arrays).ids, ids)


def test_bytes_per_token_at_k64_with_smollm2s_vocabulary() -> None:
    """128 (uint16 ids) + 16 (unary levels: 63 + 64 bits) + 2 (float16 tail) + 4 (entropies) = 150."""
    assert TopKCodec(64, 49_152).bytes_per_token() == 150
    assert TopKCodec(1, 49_152).bytes_per_token() == 2 + 0 + 2 + 4


def test_t1_rows_are_exact_up_to_the_level_rounding(teacher: torch.nn.Module) -> None:
    """At T = 1 every bucket distribution sums to 1 and is within 1e-3 nats of the live one; ids exact."""
    codec = TopKCodec(TOP_K, VOCAB)
    batch = batches(1)[0]
    (full,) = teacher_log_probs(teacher, batch, VOCAB)
    top, ids = full.topk(TOP_K, dim=-1)
    decoded = codec.decode(codec.encode(ids, top, *tail_statistics(full, ids, codec.exponents)))
    exact = teacher_top_k(teacher, batch, TOP_K, 1.0, VOCAB)
    torch.testing.assert_close(buckets(decoded).exp().sum(-1), torch.ones(len(ids), dtype=torch.float64))
    kl = bucket_kl(exact, decoded)
    assert kl.max() < 1e-3 and kl.median() > 0  # quantised, not stored as is


def test_tail_statistics_are_renyi_entropies_of_the_normalised_tail() -> None:
    log_probs = torch.log_softmax(torch.randn(3, 50, generator=torch.Generator().manual_seed(1)) * 3, -1)
    ids = log_probs.topk(5, -1).indices
    mass, entropy = tail_statistics(log_probs, ids, (0.5, 1.0, 2.0))
    rest = log_probs.double().scatter(1, ids, float("-inf")).exp()
    q = rest / rest.sum(-1, keepdim=True)
    torch.testing.assert_close(mass.double(), rest.sum(-1).log(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(entropy[:, 0].double(), 2 * q.sqrt().sum(-1).log(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy[:, 1].double(), -(q * q.clamp_min(1e-300).log()).sum(-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy[:, 2].double(), -(q**2).sum(-1).log(), rtol=1e-5, atol=1e-5)


# Tolerances of the decoded bucket distribution at T vs the live one (max over tokens, nats; measured maxima
# 7e-4, 2e-4, 3e-5, 7e-6, 1e-5): at the stored exponents (T = 1/2, 1, 2, 4) only the 64-level rounding of
# the top-k and the 8-bit entropies differ; T = 3 interpolates the tail's entropy between s = 1/4 and 1/2.
SWEEP = {0.5: 2e-3, 1.0: 5e-4, 2.0: 1e-4, 4.0: 3e-5, 3.0: 5e-5}


def test_a_temperature_sweep_reads_one_cache_built_once(teacher: torch.nn.Module, tmp_path: Path) -> None:
    data = batches()
    first = LogitCache.build(teacher, [data], tmp_path, top_k=TOP_K, temperature=1.0, vocab_size=VOCAB)
    calls: list[int] = []
    handle = teacher.register_forward_hook(lambda *_: calls.append(1))
    try:
        for temperature, tolerance in SWEEP.items():
            cache = LogitCache.build(teacher, [data], tmp_path, top_k=TOP_K, temperature=temperature, vocab_size=VOCAB)
            assert cache.path == first.path and cache.temperature == temperature
            assert not calls  # the same directory, read back: the teacher did not run
            for batch in data:
                with torch.no_grad():
                    live = teacher_top_k(teacher, batch, TOP_K, temperature, VOCAB)
                kl = bucket_kl(live, cache.lookup(batch))
                assert kl.max() < tolerance, (temperature, kl.max())
                assert torch.equal(first.lookup(batch, temperature).log_probs, cache.lookup(batch).log_probs)
    finally:
        handle.remove()
    assert [p.name for p in tmp_path.iterdir()] == [first.path.name]


def test_a_method_reads_the_cache_at_its_losss_temperature(teacher: torch.nn.Module, tmp_path: Path) -> None:
    data = batches(1)
    cache = LogitCache.build(teacher, [data], tmp_path, top_k=TOP_K, temperature=1.0, vocab_size=VOCAB)
    loss = TokenDistillationLoss(ForwardKL(temperature=2.0), alpha=0.5, vocab_size=VOCAB)
    check_cache(cache, loss, teacher)  # checks only: the cache keeps reading at the temperature it was opened at
    assert cache.temperature == 1.0
    module = TokenKD(random_llama(vocab_size=VOCAB, seed=3), loss, torch.optim.AdamW, logit_cache=cache)
    rows = module.teacher_outputs(loss, data[0], monitor_kl=False)["teacher_topk"]
    torch.testing.assert_close(rows.tail, cache.lookup(data[0], 2.0).tail)
    torch.testing.assert_close(rows.log_probs, cache.lookup(data[0], 2.0).log_probs)
    assert not torch.allclose(rows.tail, cache.lookup(data[0], 1.0).tail)


class TopKOnly:
    """A remote-style scorer: the teacher's top-k and tail mass at T = 1, no tail power sums."""

    identity = "remote:test"

    def __init__(self, teacher: torch.nn.Module) -> None:
        self.teacher = teacher

    def top_k_batch(self, batch: dict[str, Tensor], top_k: int, temperature: float, vocab_size: int) -> SparseTeacher:
        assert temperature == 1.0
        return teacher_top_k(self.teacher, batch, top_k, temperature, vocab_size)


def test_a_cache_of_top_k_and_tail_mass_only_reads_at_t1_only(teacher: torch.nn.Module, tmp_path: Path) -> None:
    data = batches(1)
    cache = LogitCache.build(TopKOnly(teacher), [data], tmp_path, top_k=TOP_K, temperature=1.0, vocab_size=VOCAB)
    assert cache.meta["tail_exponents"] == [] and cache.arrays["entropy"].shape[1] == 0
    assert bucket_kl(teacher_top_k(teacher, data[0], TOP_K, 1.0, VOCAB), cache.lookup(data[0])).max() < 1e-3
    with pytest.raises(ConfigError, match=r"tail mass at T=1 only.*llm.loss.divergence.temperature=2"):
        cache.read_at(2.0)
    with pytest.raises(ConfigError, match=r"^llm.loss.divergence.temperature=2.0: .*tail mass at T=1 only"):
        LogitCache.build(TopKOnly(teacher), [data], tmp_path, top_k=TOP_K, temperature=2.0, vocab_size=VOCAB)


def write_format_2(teacher: torch.nn.Module, data: list[dict[str, Tensor]], root: Path, temperature: float) -> Path:
    """A cache as format 2 wrote it: int32 ids, float16 log-probs, float32 tail at ``temperature``, in its key."""
    layout, rows = {}, []
    for batch in data:
        top = teacher_top_k(teacher, batch, TOP_K, temperature, VOCAB)
        first = 0
        for key, count in example_keys(batch):
            if key not in layout:
                layout[key] = [sum(len(r[0]) for r in rows), count]
                rows.append(tuple(column[first : first + count] for column in top))
            first += count
    settings = {"format_version": 2, "teacher": weights_digest(teacher), "top_k": TOP_K}
    settings |= {"temperature": float(temperature), "vocab_size": VOCAB}
    path = root / cache_key(data=sorted(layout.items()), **settings)
    path.mkdir(parents=True)
    arrays = {"ids": np.int32, "log_probs": np.float16, "tail": np.float32}
    for index, (name, dtype) in enumerate(arrays.items()):
        np.save(path / f"{name}.npy", torch.cat([r[index] for r in rows]).numpy().astype(dtype))
    files = {name: array_record(path / f"{name}.npy") for name in arrays}
    (path / "index.json").write_text(json.dumps(layout))
    num_tokens = sum(count for _, count in layout.values())
    (path / "meta.json").write_text(json.dumps({**settings, "num_tokens": num_tokens, "files": files}))
    return path


def test_a_format_2_cache_still_reads_at_its_own_temperature_only(
    teacher: torch.nn.Module, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = batches(2)
    old = write_format_2(teacher, data, tmp_path, 2.0)
    calls: list[int] = []
    handle = teacher.register_forward_hook(lambda *_: calls.append(1))
    with caplog.at_level(logging.WARNING, logger="kd_lightning.llm.logit_cache"):
        cache = LogitCache.build(teacher, [data], tmp_path, top_k=TOP_K, temperature=2.0, vocab_size=VOCAB)
    handle.remove()
    assert cache.path == old and cache.legacy and not calls
    assert caplog.text.count("format 2") == 1
    live = teacher_top_k(teacher, data[1], TOP_K, 2.0, VOCAB)
    read = cache.lookup(data[1])
    assert torch.equal(read.ids, live.ids) and torch.equal(read.tail, live.tail)
    torch.testing.assert_close(read.log_probs, live.log_probs, atol=2e-3, rtol=1e-3)  # float16
    with pytest.raises(ConfigError, match=r"format 2.*T=2.0.*temperature=1"):
        cache.lookup(data[1], 1.0)
    with pytest.raises(ConfigError, match=r"format 2"):
        LogitCache(old, temperature=4.0)
    other = LogitCache.build(teacher, [data], tmp_path, top_k=TOP_K, temperature=1.0, vocab_size=VOCAB)
    assert other.path != old and not other.legacy  # another temperature: a format-3 cache is built


def _refuse(*args: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("where", ["posix_fallocate", "pwrite"])
def test_a_full_disk_is_one_line_and_leaves_no_temporary_files(
    teacher: torch.nn.Module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    monkeypatch.setattr(cache_codec.os, where, _refuse)
    with pytest.raises(ConfigError, match=r"^no space left .*llm.teacher_cache.directory=.* needs \d+\.\d MiB"):
        LogitCache.build(teacher, [batches(1)], tmp_path, top_k=TOP_K, temperature=1.0, vocab_size=VOCAB)
    assert list(tmp_path.iterdir()) == []
