"""Peak CPU memory of the token distillation loss + backward: naive full logits vs the chunked loss.

    python scripts/bench/llm_loss_memory.py                 # B*T = 4096, V = 49,152, H = 576 (SmolLM2)
    python scripts/bench/llm_loss_memory.py --tokens 1024   # quicker

Each implementation runs in its own fresh subprocess, which allocates the inputs (student and teacher
hidden states, both ``lm_head`` weights, labels), records its resident set size, runs loss + backward
once and reads the peak RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``, the kernel's high-water
mark of resident pages), after a warm-up call on 8 tokens has loaded the kernels. "Loss peak" is that peak
minus the RSS just before the loss: the working memory
of the loss and its backward, the quantity chunking changes; the interpreter, torch and the inputs are
the same in both and counted in "process peak". The subprocesses save the loss and the gradients
(hidden states and ``lm_head`` weight), which this script compares. Writes ``docs/results/llm_loss_memory.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from kd_lightning.llm.divergences import ForwardKL
from kd_lightning.llm.token_loss import TokenDistillationLoss

ROOT = Path(__file__).resolve().parents[2]
ALPHA = 0.5
MMAP_THRESHOLD = 1 << 17  # bytes


def rss_mib() -> float:
    """Current resident set size (Linux /proc), MiB."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() / 2**20


def inputs(tokens: int, vocab: int, hidden: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    batch = 4
    length = tokens // batch
    student_hidden = torch.randn(batch, length, hidden, generator=g).requires_grad_()
    teacher_hidden = torch.randn(batch, length, hidden, generator=g)
    student_head, teacher_head = nn.Linear(hidden, vocab, bias=False), nn.Linear(hidden, vocab, bias=False)
    with torch.no_grad():
        student_head.weight.copy_(torch.randn(vocab, hidden, generator=g) * hidden**-0.5)
        teacher_head.weight.copy_(torch.randn(vocab, hidden, generator=g) * hidden**-0.5)
    teacher_head.requires_grad_(False)
    labels = torch.randint(0, vocab, (batch, length), generator=g)
    return student_hidden, student_head, teacher_hidden, teacher_head, labels


def naive(student_hidden, student_head, teacher_hidden, teacher_head, labels) -> torch.Tensor:
    """The textbook version: full [B, T, V] logits for both models, shift, log_softmax, KL, mask, mean."""
    logits = student_head(student_hidden)[:, :-1]
    with torch.no_grad():
        teacher_logits = teacher_head(teacher_hidden)[:, :-1]
    targets = labels[:, 1:]
    valid = targets != -100
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
    log_s, log_t = F.log_softmax(logits, dim=-1), F.log_softmax(teacher_logits, dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)
    return ((1 - ALPHA) * ce + ALPHA * kl[valid].sum()) / valid.sum()


def chunked(chunk_size: int):
    loss = TokenDistillationLoss(ForwardKL(), alpha=ALPHA, chunk_size=chunk_size)

    def run(student_hidden, student_head, teacher_hidden, teacher_head, labels) -> torch.Tensor:
        out = loss(student_hidden, student_head, labels, teacher_hidden=teacher_hidden, teacher_head=teacher_head)
        return out.total / out.count

    return run


def worker(args: argparse.Namespace) -> None:
    """One measurement in this (fresh) process; prints JSON, saves loss and gradients to ``args.out``."""
    torch.set_num_threads(args.threads)
    fn = naive if args.impl == "naive" else chunked(args.chunk_size)
    fn(*inputs(8, args.vocab, args.hidden)).backward()  # warm-up: loads kernels and code pages, not measured
    tensors = inputs(args.tokens, args.vocab, args.hidden)
    before = rss_mib()
    start = time.perf_counter()
    value = fn(*tensors)
    value.backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    student_hidden, student_head = tensors[0], tensors[1]
    torch.save({"loss": value.detach(), "hidden": student_hidden.grad, "weight": student_head.weight.grad}, args.out)
    print(json.dumps({"before_mib": before, "peak_mib": peak, "seconds": seconds}))


def measure(args: argparse.Namespace, impl: str, out: Path) -> dict[str, float]:
    command = [sys.executable, __file__, "--worker", "--impl", impl, "--out", str(out)]
    for name in ("tokens", "vocab", "hidden", "chunk_size", "threads"):
        command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    # glibc serves blocks above this size with mmap and unmaps them on free, so resident memory follows
    # live tensors instead of a heap that fragments and never shrinks (the same for both implementations).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
    result = subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT, env=env)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4096, help="B * T (B = 4)")
    parser.add_argument("--vocab", type=int, default=49_152)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--chunk-size", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "results" / "llm_loss_memory.md")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--impl", choices=["naive", "chunked"], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    with tempfile.TemporaryDirectory() as tmp:
        files = {impl: Path(tmp) / f"{impl}.pt" for impl in ("naive", "chunked")}
        stats = {impl: measure(args, impl, path) for impl, path in files.items()}
        naive_out, chunked_out = (torch.load(files[impl]) for impl in ("naive", "chunked"))
    diffs = {}
    for name in ("loss", "hidden", "weight"):
        a, b = chunked_out[name], naive_out[name]
        diffs[name] = float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))
    loss_peak = {impl: s["peak_mib"] - s["before_mib"] for impl, s in stats.items()}
    ratio = loss_peak["naive"] / loss_peak["chunked"]

    command = "python scripts/bench/llm_loss_memory.py" + "".join(
        f" --{name.replace('_', '-')} {getattr(args, name)}" for name in ("tokens", "vocab", "hidden", "chunk_size")
    )
    rows = [
        "| implementation | loss peak (MiB) | process peak (MiB) | loss + backward (s) |",
        "|---|---:|---:|---:|",
    ]
    for impl, label in (("naive", "naive: full logits"), ("chunked", f"chunked ({args.chunk_size} tokens)")):
        s = stats[impl]
        rows.append(f"| {label} | {loss_peak[impl]:,.0f} | {s['peak_mib']:,.0f} | {s['seconds']:.1f} |")
    per_logits = args.tokens * args.vocab * 4 / 2**20
    text = f"""# Token distillation loss: peak memory, naive vs chunked

Forward KL with cross-entropy (alpha = {ALPHA}), loss + backward once, CPU float32, {args.threads} threads,
B*T = {args.tokens} tokens (B = 4), V = {args.vocab:,}, H = {args.hidden} (SmolLM2-135M's sizes), every
token labelled. Command (about 2 minutes on 2 shared cores):

    {command}

{chr(10).join(rows)}

**Loss peak: chunked is {ratio:.1f}x lower.**

How it is measured: each implementation runs in a fresh subprocess that first calls it once on 8 tokens
(loading kernels and code pages), allocates the inputs (hidden states, both `lm_head` weights, labels),
then runs loss + backward once. "Process peak" is the kernel's high-water mark of resident memory
(`getrusage(RUSAGE_SELF).ru_maxrss`): interpreter, torch and inputs included. "Loss peak" is that minus
the resident size just before the loss: the working memory of the loss and its backward, including the
`lm_head` weight gradient ({args.vocab * args.hidden * 4 / 2**20:.0f} MiB) that both need. Both run with
`MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}`, so glibc returns freed tensors to the system and resident
memory tracks live tensors rather than a fragmented heap. The naive version holds several `[B*T, V]`
float32 tensors ({per_logits:,.0f} MiB each) at once; the chunked one a few `[chunk, V]` ones, recomputed
in backward (activation checkpointing) at the cost of a second pass through both heads.

Agreement (max |chunked - naive| / max |naive|): loss {diffs["loss"]:.1e}, gradient w.r.t. the student
hidden states {diffs["hidden"]:.1e}, w.r.t. the student `lm_head` weight {diffs["weight"]:.1e}.
"""
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(text)
    if max(diffs.values()) > 1e-5:
        raise SystemExit(f"chunked and naive disagree beyond 1e-5: {diffs}")


if __name__ == "__main__":
    main()
