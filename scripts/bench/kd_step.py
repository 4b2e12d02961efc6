"""Cost of a KD training step: kd_lightning vs its parts vs a hand-written PyTorch loop.

    python scripts/bench/kd_step.py                    # both pairs, batch 256, writes docs/performance.md
    python scripts/bench/kd_step.py --pairs mnist1d --steps 20
    python scripts/bench/kd_step.py --device cuda --precision bf16 --channels-last   # a GPU

For each teacher/student pair, on the same in-memory data, device and thread count (warm-up steps
excluded, median over steps, then the median of ``--repeats`` runs):
  (a) student training step alone (forward, CE, backward, optimizer step; plain PyTorch),
  (b) teacher inference alone (no_grad forward),
  (c) the KD step through kd_lightning (DistillationModule driven by a Lightning Trainer),
  (d) the same KD step in a plain PyTorch loop (same loss, same optimizer).
A step's time is the wall time between the starts of consecutive steps, so data loading and
framework overhead count (on CUDA each step ends with a synchronize). ``--precision bf16`` runs
every forward under bf16 autocast (Lightning: ``precision="bf16-mixed"``); ``--channels-last`` puts
conv nets and 4-D inputs in channels-last format. Targets (issue 5): c / (a + b) <= 1.05 and
c / d <= 1.10.
"""

from __future__ import annotations

import argparse
import itertools
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kd_lightning.engine.runtime import Runtime
from kd_lightning.losses import DistillationLoss, KLDivergence
from kd_lightning.methods.kd import DistillationModule
from kd_lightning.models import MLP, ConvNet1D, resnet8x4, resnet32x4
from kd_lightning.reporting.markdown import write_section

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/: what the result scripts share
from multirun import provenance

REPO = Path(__file__).resolve().parents[2]
ALPHA, TEMPERATURE, LR = 0.9, 4.0, 3e-3

#: name -> (teacher factory, student factory, input shape, classes)
PAIRS: dict[str, tuple[Callable[[], nn.Module], Callable[[], nn.Module], tuple[int, ...], int]] = {
    "mnist1d": (lambda: ConvNet1D(channels=64), lambda: MLP(hidden=48), (1, 40), 10),
    "cifar_resnet32x4_to_8x4": (resnet32x4, resnet8x4, (3, 32, 32), 100),
}


@dataclass(frozen=True)
class Setup:
    """Where and how every variant runs."""

    device: torch.device
    bf16: bool
    channels_last: bool
    compile: str | None = None

    def model(self, model: nn.Module) -> nn.Module:
        model = model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def batch(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        return (x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x), y

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def loader(shape: tuple[int, ...], classes: int, batch: int, steps: int) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch * steps, *shape, generator=generator)
    y = torch.randint(0, classes, (batch * steps,), generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=True)


def median_gap(starts: list[float], warmup: int) -> float:
    """Median gap between consecutive timestamps, ignoring the first ``warmup`` gaps."""
    return statistics.median([b - a for a, b in itertools.pairwise(starts)][warmup:])


def timed(steps: Iterator[None], warmup: int, setup: Setup) -> float:
    """Median step time of a generator that yields after each step (gaps between step ends)."""
    stamps = []
    for _ in steps:
        setup.sync()
        stamps.append(time.perf_counter())
    return median_gap(stamps, warmup)


def student_only(student: nn.Module, data: DataLoader, setup: Setup) -> Iterator[None]:
    optimizer = torch.optim.AdamW(student.parameters(), lr=LR)
    for batch in data:
        x, y = setup.batch(*batch)
        with setup.autocast():
            loss = F.cross_entropy(student(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        yield


def teacher_only(teacher: nn.Module, data: DataLoader, setup: Setup) -> Iterator[None]:
    teacher.eval()
    for batch in data:
        x, _ = setup.batch(*batch)
        with torch.no_grad(), setup.autocast():
            teacher(x)
        yield


def plain_kd(student: nn.Module, teacher: nn.Module, data: DataLoader, setup: Setup) -> Iterator[None]:
    optimizer = torch.optim.AdamW(student.parameters(), lr=LR)
    teacher.eval()
    for batch in data:
        x, y = setup.batch(*batch)
        with torch.no_grad(), setup.autocast():
            t = teacher(x)
        with setup.autocast():
            s = student(x)
        s, t = s.float(), t.float()
        kl = F.kl_div(
            F.log_softmax(s / TEMPERATURE, -1),
            F.log_softmax(t / TEMPERATURE, -1),
            reduction="batchmean",
            log_target=True,
        )
        loss = (1 - ALPHA) * F.cross_entropy(s, y) + ALPHA * TEMPERATURE**2 * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        yield


class StepClock(L.Callback):
    """Records the start time of every training batch (after the previous step's GPU work finished)."""

    def __init__(self, setup: Setup) -> None:
        self.setup = setup
        self.starts: list[float] = []

    def on_train_batch_start(self, *args: object) -> None:
        self.setup.sync()
        self.starts.append(time.perf_counter())

    def on_train_end(self, *args: object) -> None:
        self.setup.sync()
        self.starts.append(time.perf_counter())


def bench_trainer(accelerator: str, callbacks: list[L.Callback], **kwargs: object) -> L.Trainer:
    """A one-device Trainer for timing training epochs: no validation, logging, checkpoints or bars."""
    return L.Trainer(
        accelerator=accelerator,
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=callbacks,
        **kwargs,
    )


def lightning_kd(
    student: nn.Module, teacher: nn.Module, data: DataLoader, classes: int, warmup: int, setup: Setup
) -> float:
    module = DistillationModule(
        student=student,
        teacher=teacher,
        num_classes=classes,
        optimizer=partial(torch.optim.AdamW, lr=LR),
        loss=DistillationLoss({"kd": KLDivergence()}, alpha=ALPHA, temperature=TEMPERATURE),
        runtime=Runtime(channels_last=setup.channels_last, compile=setup.compile),
    )
    clock = StepClock(setup)
    trainer = bench_trainer(
        setup.device.type, [clock], max_epochs=1, precision="bf16-mixed" if setup.bf16 else "32-true"
    )
    trainer.fit(module, data)
    return median_gap(clock.starts, warmup)


def measure(pair: str, batch: int, steps: int, warmup: int, repeats: int, setup: Setup) -> dict[str, float]:
    make_teacher, make_student, shape, classes = PAIRS[pair]
    results: dict[str, list[float]] = {"a": [], "b": [], "c": [], "d": []}
    for repeat in range(repeats):
        torch.manual_seed(repeat)
        teacher, student = setup.model(make_teacher()), make_student()
        data = loader(shape, classes, batch, steps + warmup)
        results["a"].append(timed(student_only(setup.model(make_student()), data, setup), warmup, setup))
        results["b"].append(timed(teacher_only(teacher, data, setup), warmup, setup))
        results["d"].append(timed(plain_kd(setup.model(make_student()), teacher, data, setup), warmup, setup))
        results["c"].append(lightning_kd(student, teacher, data, classes, warmup, setup))
    return {name: statistics.median(values) for name, values in results.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--precision", choices=["32", "bf16"], default="32")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", choices=["teacher", "student", "both"], help="runtime.compile for (c) only")
    parser.add_argument("--section", default="kd-step", help="marker name of the table in --out")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "performance.md")
    args = parser.parse_args()
    setup = Setup(torch.device(args.device), args.precision == "bf16", args.channels_last, args.compile)

    rows = []
    for pair in args.pairs:
        t = measure(pair, args.batch, args.steps, args.warmup, args.repeats, setup)
        rows.append(
            f"| {pair} | {1e3 * t['a']:.1f} | {1e3 * t['b']:.1f} | {1e3 * t['c']:.1f} | {1e3 * t['d']:.1f} "
            f"| {args.batch / t['c']:,.0f} | {t['c'] / (t['a'] + t['b']):.3f} | {t['c'] / t['d']:.3f} |"
        )
        print(rows[-1], flush=True)
    command = " ".join(
        [
            "python scripts/bench/kd_step.py",
            "--pairs",
            *args.pairs,
            "--batch",
            str(args.batch),
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup),
            "--repeats",
            str(args.repeats),
            *(["--device", args.device] if args.device != "cpu" else []),
            *(["--precision", args.precision] if args.precision != "32" else []),
            *(["--channels-last"] if args.channels_last else []),
            *(["--compile", args.compile] if args.compile else []),
            *(["--section", args.section] if args.section != "kd-step" else []),
        ]
    )
    if setup.device.type == "cuda":
        where = f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    else:
        cpu = platform.processor() or platform.machine()
        where = f"{cpu}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, CPU"
    numerics = ("bf16 autocast" if setup.bf16 else "float32") + (", channels_last" if setup.channels_last else "")
    numerics += f", (c) with runtime.compile={setup.compile}" if setup.compile else ""
    lines = [
        "<!-- kd-step table: written by scripts/bench/kd_step.py -->",
        f"Command: `{command}` ({provenance()})  ",
        f"Machine: {where}, {numerics}. Time per step in ms (median over {args.steps} steps after "
        f"{args.warmup} warm-up steps, median of {args.repeats} runs); (a) student step alone, (b) teacher "
        "inference alone, (c) KD step through kd_lightning (Lightning Trainer), (d) the same KD step in a "
        "plain PyTorch loop.",
        "",
        "| pair | (a) student | (b) teacher | (c) kd_lightning | (d) plain loop | samples/s (c) | c / (a + b) "
        "| c / d |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
    ]
    write_section(args.out, "\n".join(lines), args.section)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
