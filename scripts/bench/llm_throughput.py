"""Training throughput of the SmolLM2 LM-distillation demo: tokens/s with the teacher run live vs read from the
teacher top-k cache (llm/teacher_cache=top_k), and the student alone (SFT) as the floor.

    python scripts/bench/llm_throughput.py --device cuda      # writes docs/gpu.md (section llm-throughput)
    python scripts/bench/llm_throughput.py --device cpu --steps 8 --warmup 2 --out docs/performance.md \
        --section llm-throughput-cpu

Teacher: SmolLM2-135M-Instruct (GGUF, float32 weights); student: 8 of its layers; forward KL, batch --batch of
arithmetic problems with reference completions (llm.data arithmetic); bf16-mixed on CUDA, 32-true on CPU.
Tokens/s = labelled (distilled) tokens of the timed steps / their wall time (synchronised), after --warmup
steps; the cache is built before timing (its build time is reported beside).
"""

from __future__ import annotations

import argparse
import functools
import platform
import time
from pathlib import Path

import torch
from cifar_throughput import Throughput
from kd_step import REPO, bench_trainer, write_section

from kd_lightning.llm.data import LLMDataModule
from kd_lightning.llm.divergences import ForwardKL
from kd_lightning.llm.logit_cache import LogitCache
from kd_lightning.llm.models import layer_subset, load_gguf_model, load_gguf_tokenizer
from kd_lightning.llm.token_loss import TokenDistillationLoss
from kd_lightning.llm.tokens import IGNORE_INDEX
from kd_lightning.methods.lm import SFT, TokenKD


def labelled_tokens(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def measure(teacher, tokenizer, args: argparse.Namespace, mode: str, cache_root: Path) -> tuple[float, float]:
    """``(tokens/s, cache build seconds)`` of one variant: ``mode`` live, cached or none (SFT)."""
    torch.manual_seed(0)
    steps = args.steps
    data = LLMDataModule(
        tokenizer,
        train_prompts={"kind": "arithmetic", "num_prompts": args.batch * steps, "seed": 0},
        val_prompts={"kind": "arithmetic", "num_prompts": 4, "seed": 0, "split": "heldout"},
        batch_size=args.batch,
    )
    loss = TokenDistillationLoss(ForwardKL(), alpha=1.0, vocab_size=len(tokenizer))
    cache, build = None, 0.0
    if mode == "cached":
        start = time.perf_counter()
        cache = LogitCache.build(
            teacher.to(args.device),
            [data.train_dataloader(), data.val_dataloader()],
            cache_root,
            top_k=32,
            temperature=1.0,
            vocab_size=len(tokenizer),
        )
        build = time.perf_counter() - start
    common = {
        "student": layer_subset(teacher, num_layers=8),
        "optimizer": functools.partial(torch.optim.AdamW, lr=1e-4),
    }
    if mode == "none":
        module = SFT(**common, vocab_size=len(tokenizer))
    else:
        module = TokenKD(**common, loss=loss, teacher=teacher if mode == "live" else None, logit_cache=cache)
    clock = Throughput(args.warmup, labelled_tokens)
    precision = "bf16-mixed" if args.device == "cuda" else "32-true"
    trainer = bench_trainer(args.device, [clock], max_steps=steps, precision=precision, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=data)
    return clock.images / clock.seconds, build


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=60, help="training steps per variant (warm-up included)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "gpu.md")
    parser.add_argument("--section", default="llm-throughput")
    parser.add_argument("--cache-root", type=Path, default=Path("/tmp/kd_llm_throughput_cache"))
    args = parser.parse_args()
    if args.steps <= args.warmup:
        parser.error("--steps must exceed --warmup")
    if args.device == "cpu":
        torch.set_num_threads(1)
    teacher, tokenizer = load_gguf_model().requires_grad_(False), load_gguf_tokenizer()
    cells = {mode: measure(teacher, tokenizer, args, mode, args.cache_root) for mode in ("none", "live", "cached")}
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.processor() or 'cpu'}, 1 thread"
    lines = [
        f"SmolLM2-135M-Instruct -> 8 of its layers, forward KL, batch {args.batch} arithmetic problems, "
        f"{args.steps - args.warmup} timed steps after {args.warmup}; {device}, torch {torch.__version__}. "
        f"Command: `python scripts/bench/llm_throughput.py --device {args.device} --batch {args.batch} "
        f"--steps {args.steps} --warmup {args.warmup}`",
        "",
        "| student alone (tokens/s) | KD, live teacher | KD, cached teacher (top-32) | cached / live "
        "| cache build (s) |",
        "|---|---|---|---|---|",
        f"| {cells['none'][0]:,.0f} | {cells['live'][0]:,.0f} | {cells['cached'][0]:,.0f} | "
        f"{cells['cached'][0] / cells['live'][0]:.2f} | {cells['cached'][1]:.0f} |",
    ]
    write_section(args.out, "\n".join(lines), args.section)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
