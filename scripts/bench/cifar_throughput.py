"""Training throughput of the CIFAR-100 benchmark pair (resnet32x4 -> resnet8x4) on synthetic 32x32 batches.

    python scripts/bench/cifar_throughput.py --device cuda     # writes docs/gpu.md (section cifar-throughput)
    python scripts/bench/cifar_throughput.py --device cpu --images 512 --batch 64 --out /tmp/t.md   # a smoke run

Images per second of a KD training step (Hinton KD, SGD, batch ``--batch``) through a Lightning Trainer and
kd_lightning's DistillationModule, for: fp32 vs bf16-mixed, NCHW vs channels_last (``runtime.channels_last``),
and the teacher run live vs looked up from the teacher-output cache (``teacher_cache=memory``, tables built
before timing). Synthetic data (random images and labels, the real CIFAR shapes) through the in-memory
datamodule base and its crop + flip augmentation off, so the cache applies; the student alone (alpha = 0) is
the floor. Throughput = images of the timed steps / their wall time (synchronised), after ``--warmup`` steps.
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from kd_step import REPO, bench_trainer, write_section
from torch import Tensor

from kd_lightning.data.in_memory import InMemoryDataModule
from kd_lightning.engine.runtime import Runtime
from kd_lightning.losses import DistillationLoss, KLDivergence
from kd_lightning.methods.kd import DistillationModule
from kd_lightning.models.cifar import resnet8x4, resnet32x4
from kd_lightning.teacher import Teacher
from kd_lightning.teacher.outputs import TeacherOutputCache


class SyntheticCifar(InMemoryDataModule):
    """``images`` random 32x32 RGB images with random labels of 100 classes (fixed by ``seed``)."""

    def __init__(self, images: int, batch_size: int, seed: int = 0) -> None:
        super().__init__(batch_size=batch_size, return_index=True)
        self.images, self.seed = images, seed

    def build_splits(self) -> dict[str, tuple[Tensor, Tensor]]:
        generator = torch.Generator().manual_seed(self.seed)
        x = torch.randn(self.images, 3, 32, 32, generator=generator)
        y = torch.randint(0, 100, (self.images,), generator=generator)
        return {split: (x, y) for split in ("train", "val", "test")}

    def content_identity(self) -> dict[str, Any]:
        return {"dataset": "synthetic_cifar", "images": self.images, "seed": self.seed}


class Throughput(L.Callback):
    """Wall time of the training steps after ``warmup`` (device-synchronised) and what they processed:
    ``count(batch)``, images by default."""

    def __init__(self, warmup: int, count: Callable[[Any], int] = lambda batch: batch[0].shape[0]) -> None:
        self.warmup, self.count, self.images, self.start, self.seconds = warmup, count, 0, 0.0, 0.0

    def _sync(self, module: L.LightningModule) -> None:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, index: int) -> None:
        if trainer.global_step == self.warmup:
            self._sync(module)
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, out: Any, batch: Any, i: int) -> None:
        if trainer.global_step > self.warmup:
            self.images += self.count(batch)
            self._sync(module)
            self.seconds = time.perf_counter() - self.start


def measure(args: argparse.Namespace, precision: str, channels_last: bool, teacher_mode: str) -> float:
    """Images/s of one variant: ``teacher_mode`` live, cached or none (the student alone)."""
    torch.manual_seed(0)
    data = SyntheticCifar(args.images, args.batch)
    teacher = None
    if teacher_mode != "none":
        cache = TeacherOutputCache("memory") if teacher_mode == "cached" else None
        teacher = Teacher(resnet32x4(), cache=cache)
    alpha = 0.0 if teacher_mode == "none" else 0.9
    module = DistillationModule(
        student=resnet8x4(),
        teacher=teacher,
        num_classes=100,
        optimizer=partial(torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=5e-4),
        loss=DistillationLoss({"kd": KLDivergence()}, alpha=alpha, temperature=4.0),
        runtime=Runtime(channels_last=channels_last),
    )
    if channels_last and teacher is not None:
        teacher.model.to(memory_format=torch.channels_last)
    clock = Throughput(args.warmup)
    trainer = bench_trainer(args.device, [clock], max_epochs=1, precision=precision, limit_train_batches=args.steps)
    trainer.fit(module, datamodule=data)
    return clock.images / clock.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=12800)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=150, help="training steps per variant (warm-up included)")
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "gpu.md")
    parser.add_argument("--section", default="cifar-throughput")
    args = parser.parse_args()
    if args.steps <= args.warmup:
        parser.error("--steps must exceed --warmup")
    precisions = ["32-true", "bf16-mixed"]
    rows = []
    for precision in precisions:
        for channels_last in (False, True):
            cells = {mode: measure(args, precision, channels_last, mode) for mode in ("none", "live", "cached")}
            layout = "channels_last" if channels_last else "NCHW"
            rows.append(
                f"| {precision} | {layout} | {cells['none']:,.0f} | {cells['live']:,.0f} | {cells['cached']:,.0f} "
                f"| {cells['cached'] / cells['live']:.2f} |"
            )
            print(rows[-1], flush=True)
    device = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    lines = [
        f"resnet32x4 -> resnet8x4, batch {args.batch}, {args.steps - args.warmup} timed steps after {args.warmup}; "
        f"{device}, torch {torch.__version__}. Command: `python scripts/bench/cifar_throughput.py --device "
        f"{args.device} --images {args.images} --batch {args.batch} --steps {args.steps} --warmup {args.warmup}`",
        "",
        "| precision | memory format | student alone (img/s) | KD, live teacher | KD, cached teacher | cached / live |",
        "|---|---|---|---|---|---|",
        *rows,
    ]
    write_section(args.out, "\n".join(lines), args.section)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
