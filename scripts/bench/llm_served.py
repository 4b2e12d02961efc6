"""Wall time per training step with the LM teacher in process vs served (llm/teacher=remote, no cache), with and
without the read-ahead overlap (llm.teacher.prefetch); writes docs/results/llm_served.md.

    OMP_NUM_THREADS=1 python scripts/bench/llm_served.py            # --steps 40 --warmup 5 --delay 0.0

The teacher (a random Llama, --teacher-hidden wide, --teacher-layers deep, character tokenizer) is served by
kd_lightning.llm.local_server.OpenAIServer in its own process (one thread: a second CPU core, as a real server is
another machine); the student (a smaller random Llama) trains with forward KL on arithmetic problems with
reference completions. --delay adds seconds to every answer (network and queueing of a shared server). Times are
the mean wall time of the steps after --warmup (Lightning's loop, no validation).
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from cifar_throughput import Throughput
from kd_step import REPO, bench_trainer, provenance

from kd_lightning.llm.data import LLMDataModule
from kd_lightning.llm.divergences import ForwardKL
from kd_lightning.llm.models import char_tokenizer, random_llama
from kd_lightning.llm.remote import RemoteTeacher
from kd_lightning.llm.served import ServedTeacher
from kd_lightning.llm.token_loss import TokenDistillationLoss
from kd_lightning.methods.lm import SFT, TokenKD

SERVE = """
import sys, torch
torch.set_num_threads(1)
from kd_lightning.llm.local_server import OpenAIServer
from kd_lightning.llm.models import char_tokenizer, random_llama
hidden, layers, delay = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
teacher = random_llama(vocab_size=99, hidden_size=hidden, num_layers=layers, intermediate_size=4 * hidden, seed=0)
with OpenAIServer(teacher, char_tokenizer()) as server:
    server.delay = delay
    print(server.base_url, flush=True)
    sys.stdin.read()
"""


def teacher_model(args: argparse.Namespace) -> torch.nn.Module:
    hidden = args.teacher_hidden
    model = random_llama(
        vocab_size=99, hidden_size=hidden, num_layers=args.teacher_layers, intermediate_size=4 * hidden
    )
    return model.requires_grad_(False)


def step_seconds(args: argparse.Namespace, variant: str, base_url: str) -> float:
    """Mean seconds per timed step of one variant: alone (the student's own step, no teacher), live, served
    (prefetch 0) or served_ahead (prefetch 2)."""
    torch.manual_seed(0)
    data = LLMDataModule(
        char_tokenizer(),
        train_prompts={"kind": "arithmetic", "num_prompts": args.batch * args.steps, "seed": 0},
        val_prompts={"kind": "arithmetic", "num_prompts": 2, "seed": 0, "split": "heldout"},
        batch_size=args.batch,
    )
    loss = TokenDistillationLoss(ForwardKL(), alpha=1.0)
    student = random_llama(vocab_size=99, hidden_size=64, num_layers=2, intermediate_size=256, seed=1)
    served = None
    if variant.startswith("served"):
        remote = RemoteTeacher(base_url, "tiny", concurrency=args.batch)  # no response cache: every step asks
        served = ServedTeacher(remote, 20, 1.0, 99, prefetch=2 if variant == "served_ahead" else 0)
        if served.prefetch:
            data.read_ahead_with(served.submit, served.prefetch - 1)
    optimizer = functools.partial(torch.optim.AdamW, lr=1e-4)
    if variant == "alone":
        module = SFT(student, optimizer)
    else:
        teacher = teacher_model(args) if variant == "live" else None
        module = TokenKD(student, loss, optimizer, teacher=teacher, served_teacher=served)
    clock = Throughput(args.warmup, lambda batch: 1)
    trainer = bench_trainer("cpu", [clock], max_steps=args.steps, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=data)
    if served is not None:
        served.close()
    return clock.seconds / clock.images


def server_seconds(args: argparse.Namespace, base_url: str) -> float:
    """Mean seconds the server takes to score one batch (its requests in flight together, no training)."""
    data = LLMDataModule(
        char_tokenizer(),
        train_prompts={"kind": "arithmetic", "num_prompts": args.batch * 8, "seed": 1},
        val_prompts={"kind": "arithmetic", "num_prompts": 2, "seed": 0, "split": "heldout"},
        batch_size=args.batch,
    )
    served = ServedTeacher(RemoteTeacher(base_url, "tiny", concurrency=args.batch), 20, 1.0, 99, prefetch=0)
    batches = list(data.train_dataloader())
    served.lookup(batches[0])  # warm-up
    start = time.perf_counter()
    for batch in batches[1:]:
        served.lookup(batch)
    served.close()
    return (time.perf_counter() - start) / (len(batches) - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=40, help="training steps per variant (warm-up included)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--teacher-hidden", type=int, default=256)
    parser.add_argument("--teacher-layers", type=int, default=4)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds added to every server answer")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "llm_served.md")
    args = parser.parse_args()
    if args.steps <= args.warmup:
        parser.error("--steps must exceed --warmup")
    torch.set_num_threads(1)
    server = subprocess.Popen(
        [sys.executable, "-c", SERVE, str(args.teacher_hidden), str(args.teacher_layers), str(args.delay)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
    )
    try:
        base_url = server.stdout.readline().strip()
        start = time.perf_counter()
        variants = ("alone", "live", "served", "served_ahead")
        cells = {variant: step_seconds(args, variant, base_url) for variant in variants}
        cells["server"] = server_seconds(args, base_url)
    finally:
        server.stdin.close()
        server.wait(timeout=30)
    command = (
        f"OMP_NUM_THREADS=1 python scripts/bench/llm_served.py --batch {args.batch} --steps {args.steps} "
        f"--warmup {args.warmup} --teacher-hidden {args.teacher_hidden} --teacher-layers {args.teacher_layers} "
        f"--delay {args.delay}"
    )
    lines = [
        "# A served LM teacher: wall time per step",
        "",
        f"Teacher: a random Llama ({args.teacher_hidden} wide, {args.teacher_layers} layers) served by "
        f"`kd_lightning.llm.local_server` in its own process (1 thread; answers delayed {args.delay} s); "
        f"student: 64 wide, 2 layers; forward KL over the top-20 + tail buckets when served; batch {args.batch}, "
        f"mean of {args.steps - args.warmup} steps after {args.warmup}; {platform.processor() or 'cpu'}, "
        f"1 training thread, torch {torch.__version__}; {time.perf_counter() - start:.0f} s in all.",
        "",
        f"Command: `{command}` ({provenance()})",
        "",
        "| teacher | ms / step | vs in process |",
        "|---|---|---|",
    ]
    names = {
        "alone": "none: the student's own step (SFT), the floor",
        "live": "in process (live)",
        "served": "served, each step waits (prefetch=0)",
        "served_ahead": "served, read ahead (prefetch=2)",
    }
    for variant, name in names.items():
        lines.append(f"| {name} | {1000 * cells[variant]:.1f} | {cells[variant] / cells['live']:.2f}x |")
    lines += [
        "",
        f"The server alone takes {1000 * cells['server']:.1f} ms to score one batch (its {args.batch} requests in "
        "flight together, no training). Read ahead, a step costs about the larger of the student's own step and "
        "that time: a server that scores a batch within a student step costs no wall time; one that does not "
        "sets the pace.",
    ]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
