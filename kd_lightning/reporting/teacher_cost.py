"""What each teacher adds to a training step: its forward time on one training batch and its memory."""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping
from typing import Any

import torch

from kd_lightning.engine.batches import Inputs, repeat_rows, to_device
from kd_lightning.teacher import Teacher

#: Forwards timed per teacher (after one warm-up); the median is reported.
REPEATS = 5


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def teacher_costs(
    teachers: Mapping[str, Teacher], example: Inputs, batch_size: int, device: torch.device
) -> dict[str, Any]:
    """Per teacher: ``params``, ``weights_mib`` (parameters and buffers), ``forward_ms`` (median wall time of
    a forward on a batch of ``batch_size`` made from the example input, on ``device`` (the teacher is moved
    there and back), synchronised)
    and ``activation_mib`` (on CUDA: the peak memory that forward allocates beyond what was allocated before;
    None on other devices). ``cached``: its training outputs come from the teacher-output cache, so training
    steps do not pay ``forward_ms``."""
    costs: dict[str, Any] = {}
    for name, teacher in teachers.items():
        model = teacher.model
        weight = next(model.parameters(), None)
        home = weight.device if weight is not None else torch.device("cpu")
        model.to(device)
        x = repeat_rows(to_device(example, device), batch_size)
        tensors = [*model.parameters(), *model.buffers()]
        weights_mib = sum(t.numel() * t.element_size() for t in tensors) / 2**20
        teacher.outputs(x)  # warm-up
        activation = None
        if device.type == "cuda":
            synchronize(device)
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(REPEATS):
            synchronize(device)
            start = time.perf_counter()
            teacher.outputs(x)
            synchronize(device)
            times.append(time.perf_counter() - start)
        if device.type == "cuda":
            activation = (torch.cuda.max_memory_allocated(device) - before) / 2**20
        model.to(home)
        costs[name] = {
            "params": sum(p.numel() for p in model.parameters()),
            "weights_mib": weights_mib,
            "forward_ms": 1e3 * statistics.median(times),
            "activation_mib": activation,
            "batch_size": batch_size,
            "device": str(device),
            "cached": teacher.cache is not None,
        }
    return costs
