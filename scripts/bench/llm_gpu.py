"""LM distillation on one CUDA GPU: tokens/s and peak memory, and the chunked token loss against the naive one.

    python scripts/bench/llm_gpu.py --out docs/results/llm_gpu.md          # on a GPU machine (scripts/gpu_llm_check.sh)
    python scripts/bench/llm_gpu.py --device cpu --smoke --out /tmp/llm_gpu.md   # the same code on tiny sizes

1. Training (SmolLM2-135M-Instruct -> 8 of its layers, forward KL, bf16-mixed, batch --batch of arithmetic problems
   with reference completions): labelled tokens/s and peak allocated memory with the teacher live, from the top-32
   cache (built first, its time beside), and with the teacher live on packed rows (llm.data.packing) vs padded ones.
2. The token loss + backward at V = 49,152 (H = 576, SmolLM2) and V = 151,936 (H = 896, Qwen2.5-0.5B's shape) on
   --tokens tokens: the naive full-logits loss vs the chunked one (chunk 512 / 2048): peak memory above the inputs and
   milliseconds (synchronised, median of 5 after 2).
Peak memory: torch.cuda.max_memory_allocated after reset_peak_memory_stats (on the CPU: not measured, "—").
"""

from __future__ import annotations

import argparse
import functools
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from cifar_throughput import Throughput
from kd_step import REPO, bench_trainer
from llm_loss_memory import chunked, inputs, naive

from kd_lightning.llm.data import LLMDataModule
from kd_lightning.llm.divergences import ForwardKL
from kd_lightning.llm.logit_cache import LogitCache
from kd_lightning.llm.models import char_tokenizer, layer_subset, load_gguf_model, load_gguf_tokenizer, random_llama
from kd_lightning.llm.token_loss import TokenDistillationLoss
from kd_lightning.llm.tokens import IGNORE_INDEX
from kd_lightning.methods.lm import TokenKD


def labelled(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def peak_mib(device: str) -> str:
    return f"{torch.cuda.max_memory_allocated() / 2**20:,.0f}" if device == "cuda" else "—"


def reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def models(args: argparse.Namespace) -> tuple[torch.nn.Module, object]:
    if args.smoke:
        return random_llama(vocab_size=99, hidden_size=64, num_layers=4, seed=0).requires_grad_(False), char_tokenizer()
    return load_gguf_model().requires_grad_(False), load_gguf_tokenizer()


def training(args: argparse.Namespace, teacher, tokenizer, variant: str, cache_root: Path) -> dict[str, str]:
    """tokens/s and peak memory of one variant: live, cached, packed (live teacher, packed rows)."""
    torch.manual_seed(0)
    packing = {"packing": True} if variant == "packed" else {}
    data = LLMDataModule(
        tokenizer,
        train_prompts={"kind": "arithmetic", "num_prompts": args.batch * args.steps, "seed": 0},
        val_prompts={"kind": "arithmetic", "num_prompts": 4, "seed": 0, "split": "heldout"},
        batch_size=args.batch,
        **packing,
    )
    loss = TokenDistillationLoss(ForwardKL(), alpha=1.0, vocab_size=len(tokenizer))
    cache, build = None, 0.0
    if variant == "cached":
        start = time.perf_counter()
        loaders = [data.train_dataloader(), data.val_dataloader()]
        cache = LogitCache.build(teacher.to(args.device), loaders, cache_root, 32, 1.0, len(tokenizer))
        build = time.perf_counter() - start
    student = layer_subset(teacher, num_layers=2 if args.smoke else 8)
    module = TokenKD(
        student,
        loss,
        functools.partial(torch.optim.AdamW, lr=1e-4),
        teacher=None if cache else teacher,
        logit_cache=cache,
    )
    clock = Throughput(args.warmup, labelled)
    precision = "bf16-mixed" if args.device == "cuda" else "32-true"
    reset_peak(args.device)
    trainer = bench_trainer(args.device, [clock], max_steps=args.steps, precision=precision, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=data)
    built = f"{build:.0f}" if cache else "—"
    return {"tokens/s": f"{clock.images / clock.seconds:,.0f}", "peak MiB": peak_mib(args.device), "build s": built}


def loss_cell(args: argparse.Namespace, vocab: int, hidden: int, chunk: int | None) -> tuple[str, str]:
    """(peak MiB above the inputs, median ms) of loss + backward; chunk None: the naive loss."""
    fn = naive if chunk is None else chunked(chunk)
    tensors = [t.to(args.device) for t in inputs(args.tokens, vocab, hidden)]  # tensors and nn.Linear heads
    times = []
    base = torch.cuda.memory_allocated() if args.device == "cuda" else 0
    reset_peak(args.device)
    for repeat in range(7):
        tensors[0].grad = None
        tensors[1].weight.grad = None
        if args.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn(*tensors).backward()
        if args.device == "cuda":
            torch.cuda.synchronize()
        if repeat >= 2:
            times.append(time.perf_counter() - start)
    above = f"{(torch.cuda.max_memory_allocated() - base) / 2**20:,.0f}" if args.device == "cuda" else "—"
    return above, f"{1000 * statistics.median(times):.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=40, help="training steps per variant (warm-up included)")
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=8192, help="tokens of the loss measurement (B = 4)")
    parser.add_argument("--smoke", action="store_true", help="tiny models and sizes (a check that the script runs)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "llm_gpu.md")
    args = parser.parse_args()
    if args.smoke:
        args.batch, args.steps, args.warmup, args.tokens = 4, 4, 1, 64
    teacher, tokenizer = models(args)
    with tempfile.TemporaryDirectory() as cache_root:
        cells = {v: training(args, teacher, tokenizer, v, Path(cache_root)) for v in ("live", "cached", "packed")}
    shapes = [(49_152, 576), (151_936, 896)] if not args.smoke else [(512, 32), (2048, 32)]
    losses = {
        (vocab, chunk): loss_cell(args, vocab, hidden, chunk) for vocab, hidden in shapes for chunk in (None, 512, 2048)
    }
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.processor() or 'cpu'}"
    pair = "tiny random Llamas (--smoke)" if args.smoke else "SmolLM2-135M-Instruct -> 8 of its layers"
    command = f"python scripts/bench/llm_gpu.py --device {args.device}" + (" --smoke" if args.smoke else "")
    lines = [
        "# LM distillation on a GPU: throughput, memory, the chunked loss",
        "",
        f"{device}, torch {torch.__version__}. Command: `{command}` (see the script's docstring for what is timed).",
        "",
        f"## Training: {pair}, forward KL, batch {args.batch}, {args.steps - args.warmup} timed steps after "
        f"{args.warmup}",
        "",
        "| teacher | tokens/s | peak memory (MiB) | cache build (s) |",
        "|---|---|---|---|",
        *(
            f"| {name} | {cells[key]['tokens/s']} | {cells[key]['peak MiB']} | {cells[key]['build s']} |"
            for key, name in (("live", "live"), ("cached", "top-32 cache"), ("packed", "live, packed rows"))
        ),
        "",
        f"## Token loss + backward on {args.tokens:,} tokens",
        "",
        "| vocabulary | loss | peak above inputs (MiB) | ms |",
        "|---|---|---|---|",
        *(
            f"| {vocab:,} | {'naive (full logits)' if chunk is None else f'chunked, {chunk}'} | {peak} | {ms} |"
            for (vocab, chunk), (peak, ms) in losses.items()
        ),
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
