"""Cost of a training epoch: student alone vs KD with the live teacher vs KD from the teacher-output cache.

    python scripts/bench/epochs.py                       # MNIST-1D default pair, writes docs/performance.md
    python scripts/bench/epochs.py --device cuda --section kd-epochs-gpu
    python scripts/bench/epochs.py --augment --sizes --batches 64 1024 --section kd-epochs-augment

The default MNIST-1D pair (ConvNet1D teacher, MLP student) on the real MNIST-1D datamodule, driven by
a Lightning Trainer (training epochs only: validation off), for:
  (i)   the student alone (alpha = 0: no teacher),
  (ii)  KD with the live teacher (alpha = 0.9, T = 4),
  (iii) KD from the teacher-output cache (``teacher_cache=disk``; tables built beforehand,
        their one-off build time reported separately).
Rows: the default data (4,000 labelled + 20,000 transfer samples) at batch 256, then dataset size
(transfer samples) and batch size sweeps. Time per epoch = median of the epochs after the first.
Peak memory: the increase of the process's peak memory during training over its state before
(CPU: maximum resident set size, in a fresh process per variant: coarse, 0 when an earlier step such
as generating the data peaked higher; CUDA: peak allocated minus allocated before training).
Target (issue 5): (iii) <= 1.10 x (i).

``--augment``: every variant trains on randomly augmented batches (:data:`AUGMENT`: function matching's
MNIST-1D transformations without mixup), and (iii) is the per-view cache (``teacher_cache=per_view``,
FKD: ``--views`` stored views per sample; its build draws the views and runs the teacher once per view).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import lightning as L
import torch

from kd_lightning.data import MNIST1DDataModule
from kd_lightning.engine.runtime import Runtime
from kd_lightning.losses import DistillationLoss, KLDivergence
from kd_lightning.methods.kd import DistillationModule
from kd_lightning.models import MLP, ConvNet1D
from kd_lightning.teacher.outputs import TeacherOutputCache
from kd_lightning.teacher.views import TeacherViewCache

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kd_step import REPO, bench_trainer, provenance, write_section

#: ``--augment``'s transformations: conf/experiment/mnist1d_function_matching.yaml's, without mixup (whose
#: batch-level mixing no per-sample view can store).
AUGMENT = {"max_shift": 4, "scale": 0.2, "shear": 1.0, "iid_noise": 0.1, "corr_noise": 0.3, "corr_noise_sigma": 1.0}
VARIANTS = {"student": "(i) student alone", "live": "(ii) KD, live teacher", "cached": "(iii) KD, cached teacher"}


class EpochClock(L.Callback):
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times: list[float] = []

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def on_train_epoch_start(self, *args: object) -> None:
        self.sync()
        self.start = time.perf_counter()

    def on_train_epoch_end(self, *args: object) -> None:
        self.sync()
        self.times.append(time.perf_counter() - self.start)


def run_variant(
    variant: str, transfer: int, batch: int, epochs: int, device: str, home: Path, views: int | None = None
) -> dict[str, float]:
    """Train ``epochs`` epochs of one variant; epoch time (median after the first), peak memory, cache build.
    ``views``: augmented data, and (iii) caches that many views per sample."""
    torch.manual_seed(0)
    augment = AUGMENT if views else None
    data = MNIST1DDataModule(
        str(home / "data"), batch_size=batch, transfer_samples=transfer, return_index=True, augment=augment
    )
    data.prepare_data()
    data.setup()
    teacher = None if variant == "student" else ConvNet1D(channels=64)
    cache = None
    if variant == "cached":
        tables = str(home / "tables")
        cache = (
            TeacherViewCache(views, location="disk", directory=tables) if views else TeacherOutputCache("disk", tables)
        )
    module = DistillationModule(
        student=MLP(hidden=48),
        teacher=teacher,
        loss=DistillationLoss({"kd": KLDivergence()}, alpha=0.0 if teacher is None else 0.9, temperature=4.0),
        optimizer=partial(torch.optim.AdamW, lr=3e-3),
        num_classes=10,
        runtime=Runtime(),
        teacher_cache=cache,
    )
    build_seconds = 0.0
    if variant == "cached":  # the one-off table build, outside the timed epochs
        start = time.perf_counter()
        cache.prepare(teacher.to(device), data, ("train",), torch.device(device))
        build_seconds = time.perf_counter() - start
    clock = EpochClock(torch.device(device))
    trainer = bench_trainer(device, [clock], max_epochs=epochs)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if device == "cuda" else peak_memory(device)
    trainer.fit(module, datamodule=data)
    return {
        "epoch_s": statistics.median(clock.times[1:]),
        "peak_mb": (peak_memory(device) - before) / 2**20,
        "build_s": build_seconds,
    }


def peak_memory(device: str) -> float:
    if device == "cuda":
        return float(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0  # KiB on Linux


def in_fresh_process(args: argparse.Namespace, variant: str, transfer: int, batch: int) -> dict[str, float]:
    """One variant in its own process, so its peak memory is its own."""
    command = [sys.executable, __file__, "--one", variant, str(transfer), str(batch)]
    command += ["--epochs", str(args.epochs), "--device", args.device, "--home", str(args.home)]
    command += ["--augment", "--views", str(args.views)] if args.augment else []
    out = subprocess.run(command, capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", type=int, nargs="*", default=[0, 10_000, 40_000], help="transfer samples")
    parser.add_argument("--batches", type=int, nargs="*", default=[64, 1024])
    parser.add_argument("--augment", action="store_true", help="augmented data; (iii) = the per-view cache")
    parser.add_argument("--views", type=int, default=8, help="--augment: stored views per sample")
    parser.add_argument("--home", type=Path, default=None, help="data and tables (default: a temporary dir)")
    parser.add_argument("--section", default="kd-epochs")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "performance.md")
    parser.add_argument("--one", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        variant, transfer, batch = args.one[0], int(args.one[1]), int(args.one[2])
        views = args.views if args.augment else None
        print(json.dumps(run_variant(variant, transfer, batch, args.epochs, args.device, args.home, views)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        args.home = args.home or Path(tmp)
        rows = [("default", 20_000, 256)]
        rows += [(f"transfer {n:,}", n, 256) for n in args.sizes]
        rows += [(f"batch {b}", 20_000, b) for b in args.batches]
        lines = []
        for label, transfer, batch in rows:
            r = {variant: in_fresh_process(args, variant, transfer, batch) for variant in VARIANTS}
            s, live, cached = r["student"], r["live"], r["cached"]
            lines.append(
                f"| {label} | {4000 + transfer:,} | {batch} | {s['epoch_s']:.2f} | {live['epoch_s']:.2f} | "
                f"{cached['epoch_s']:.2f} | {live['epoch_s'] / s['epoch_s']:.2f} | "
                f"{cached['epoch_s'] / s['epoch_s']:.2f} | {cached['build_s']:.2f} | "
                f"{s['peak_mb']:.0f} / {live['peak_mb']:.0f} / {cached['peak_mb']:.0f} |"
            )
            print(lines[-1], flush=True)
    command = f"python scripts/bench/epochs.py --epochs {args.epochs}"
    command += f" --sizes {' '.join(map(str, args.sizes))} --batches {' '.join(map(str, args.batches))}"
    command += f" --device {args.device}" if args.device != "cpu" else ""
    command += f" --augment --views {args.views}" if args.augment else ""
    command += f" --section {args.section}" if args.section != "kd-epochs" else ""
    if args.device == "cuda":
        where = f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    else:
        cpu = platform.processor() or platform.machine()
        where = f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    table = "\n".join(
        [
            "<!-- kd-epochs table: written by scripts/bench/epochs.py -->",
            f"Command: `{command}` ({provenance()})  ",
            f"Machine: {where}, float32. Seconds per training epoch (median of epochs 2-{args.epochs}); "
            "ratios to (i); cache build = one teacher pass over the training set (once per teacher and data, "
            "shared by every later run); peak memory = increase during training, MiB, (i) / (ii) / (iii)."
            + (
                f" Augmented batches ({', '.join(f'{k}={v}' for k, v in AUGMENT.items())}); (iii) = per-view cache, "
                f"{args.views} views per sample (its build: drawing them and one teacher pass per view)."
                if args.augment
                else ""
            ),
            "",
            "| setting | samples | batch | (i) student s | (ii) KD live s | (iii) KD cached s | (ii) / (i) "
            "| (iii) / (i) | cache build s | peak MiB |",
            "|---|---|---|---|---|---|---|---|---|---|",
            *lines,
        ]
    )
    write_section(args.out, table, args.section)
    print(table)


if __name__ == "__main__":
    main()
