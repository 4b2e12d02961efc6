"""Fixed per-step cost of kd_lightning over a plain PyTorch loop, with a model so small that compute is noise.

    OMP_NUM_THREADS=1 python scripts/bench/step_overhead.py   # writes its table into docs/performance.md

(c) and (d) of ``kd_step.py`` for a 40-8-10 MLP teacher and student at batch 8 (400 steps, 20 warm-up,
median of 3 runs), and between them (e): the same KD step in a bare ``LightningModule`` (its
``training_step`` is the plain loop's, automatic optimization, no callbacks or logger). What remains is
framework work per step: (e) - (d) is Lightning's loop and hooks, (c) - (e) is kd_lightning's module.
"""

from __future__ import annotations

import statistics

import lightning as L
import torch
import torch.nn.functional as F
from kd_step import (
    ALPHA,
    LR,
    REPO,
    TEMPERATURE,
    Setup,
    StepClock,
    bench_trainer,
    lightning_kd,
    loader,
    median_gap,
    plain_kd,
    provenance,
    timed,
    write_section,
)
from torch import Tensor, nn


def tiny() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(40, 8), nn.ReLU(), nn.Linear(8, 10))


class BareKD(L.LightningModule):
    """The plain loop's KD step as a LightningModule and nothing else."""

    def __init__(self, student: nn.Module, teacher: nn.Module) -> None:
        super().__init__()
        self.student, self.teacher = student, teacher.eval().requires_grad_(False)

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        with torch.no_grad():
            teacher = self.teacher(x)
        student = self.student(x)
        kl = F.kl_div(
            F.log_softmax(student / TEMPERATURE, -1),
            F.log_softmax(teacher / TEMPERATURE, -1),
            log_target=True,
            reduction="batchmean",
        )
        return (1 - ALPHA) * F.cross_entropy(student, y) + ALPHA * TEMPERATURE**2 * kl

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.student.parameters(), lr=LR)


def bare_kd(data: torch.utils.data.DataLoader, warmup: int, setup: Setup) -> float:
    clock = StepClock(setup)
    bench_trainer("cpu", [clock], max_epochs=1).fit(BareKD(tiny(), tiny()), data)
    return median_gap(clock.starts, warmup)


def main() -> None:
    setup = Setup(torch.device("cpu"), bf16=False, channels_last=False)
    plain, bare, lightning = [], [], []
    for _ in range(3):
        data = loader((1, 40), 10, batch=8, steps=400)
        plain.append(timed(plain_kd(tiny(), tiny(), data, setup), 20, setup))
        bare.append(bare_kd(data, 20, setup))
        lightning.append(lightning_kd(tiny(), tiny(), data, 10, 20, setup))
    c, d, e = (1e6 * statistics.median(times) for times in (lightning, plain, bare))
    lines = [
        "<!-- step-overhead table: written by scripts/bench/step_overhead.py -->",
        f"Command: `OMP_NUM_THREADS=1 python scripts/bench/step_overhead.py` ({provenance()})  ",
        f"A 40-8-10 MLP teacher and student at batch 8 on the CPU, torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch thread(s); median step time over 400 steps after 20 warm-up steps, "
        "median of 3 runs.",
        "",
        "| step | µs per step | fixed cost over the row above |",
        "|---|---|---|",
        f"| (d) plain PyTorch loop | {d:,.0f} | — |",
        f"| (e) the same step in a bare `LightningModule` | {e:,.0f} | {e - d:,.0f} (Lightning's loop and hooks) |",
        f"| (c) kd_lightning's `DistillationModule` | {c:,.0f} | {c - e:,.0f} (kd_lightning's module) |",
    ]
    print("\n".join(lines))
    write_section(REPO / "docs" / "performance.md", "\n".join(lines), "step-overhead")


if __name__ == "__main__":
    main()
