"""How many CPU threads torch uses: the ``cpu_threads`` option every entry point shares.

torch's default intra-op thread count is every core the process may run on. For the small models that
fill most of a KD study (the MNIST-1D nets have 10^3-10^5 parameters), a kernel's work is too small to
split: a second thread costs more in hand-offs than it computes, and when another process is busy on the
same cores, OpenMP's spinning workers wait for each other's time slices and a run can take 20x longer
(docs/performance.md, "CPU: end to end"). ``auto`` therefore picks

* torch's choice, when ``OMP_NUM_THREADS`` is set (the user already decided);
* 1 thread, when the largest model of the run has fewer than :data:`SMALL_MODEL_PARAMETERS` parameters;
* otherwise the cores this process may use (its CPU affinity mask: ``taskset``, cgroup cpusets and SLURM
  allocations narrow it) divided among the processes of this node (CPU DDP).

For a multi-process CPU run the choice is also exported as ``OMP_NUM_THREADS`` (unless already set), which
is what Lightning's launchers hand the processes they start.

An integer sets that many threads; ``null`` leaves torch's default alone.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable

import torch
from torch import nn

from kd_lightning.engine.checks import usable_cores
from kd_lightning.engine.errors import ConfigError

log = logging.getLogger(__name__)

#: Below this many parameters (largest model of the run) ``auto`` uses one thread.
SMALL_MODEL_PARAMETERS = 1_000_000

CpuThreads = int | str | None


def check_cpu_threads(setting: CpuThreads, key: str) -> None:
    """Refuse anything but a positive integer, ``auto`` or null, naming ``key``."""
    if setting is None or setting == "auto":
        return
    if isinstance(setting, bool) or not isinstance(setting, int) or setting < 1:
        raise ConfigError(f"{key}={setting!r}: use auto, a number of threads >= 1, or null for torch's default")


def choose_cpu_threads(setting: CpuThreads, models: Iterable[nn.Module], processes: int = 1) -> int | None:
    """The thread count ``setting`` means for these models and this many processes per node; None: torch's."""
    if setting is None:
        return None
    if setting != "auto":
        return int(setting)
    if "OMP_NUM_THREADS" in os.environ:
        return None
    largest = max((sum(p.numel() for p in model.parameters()) for model in models), default=0)
    if largest < SMALL_MODEL_PARAMETERS:
        return 1
    return max(1, usable_cores() // max(1, processes))


def set_cpu_threads(setting: CpuThreads, models: Iterable[nn.Module], key: str, processes: int = 1) -> int:
    """Apply ``setting`` (checked, naming ``key``) with :func:`torch.set_num_threads`; returns the threads in use."""
    check_cpu_threads(setting, key)
    threads = choose_cpu_threads(setting, [model for model in models if isinstance(model, nn.Module)], processes)
    if threads is not None and threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    if threads is not None and processes > 1:  # what Lightning's launchers give the processes they start
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    log.debug("%s=%s: %d torch threads", key, setting, torch.get_num_threads())
    return torch.get_num_threads()
