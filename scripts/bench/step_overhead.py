"""Fixed per-step cost of kd_lightning over a plain PyTorch loop, with a model so small that compute is noise.

    OMP_NUM_THREADS=1 python scripts/bench/step_overhead.py

(c) and (d) of ``kd_step.py`` for a 40-8-10 MLP teacher and student at batch 8 (400 steps, 20 warm-up,
median of 3 runs): what remains is framework work per step (Lightning's loop and hooks, our module).
"""

from __future__ import annotations

import statistics

import torch
from kd_step import Setup, lightning_kd, loader, plain_kd, timed
from torch import nn


def tiny() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(40, 8), nn.ReLU(), nn.Linear(8, 10))


def main() -> None:
    setup = Setup(torch.device("cpu"), bf16=False, channels_last=False)
    plain, lightning = [], []
    for _ in range(3):
        data = loader((1, 40), 10, batch=8, steps=400)
        plain.append(timed(plain_kd(tiny(), tiny(), data, setup), 20, setup))
        lightning.append(lightning_kd(tiny(), tiny(), data, 10, 20, setup))
    c, d = statistics.median(lightning), statistics.median(plain)
    print(f"kd_lightning step {c * 1e6:.0f} us, plain loop {d * 1e6:.0f} us, overhead {(c - d) * 1e6:.0f} us")


if __name__ == "__main__":
    main()
