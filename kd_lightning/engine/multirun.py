"""Whether this process runs one job of a Hydra multirun; imports only Hydra, so the entry points can ask
before Lightning is imported (importing Lightning first would change how it logs)."""

from __future__ import annotations

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode


def in_multirun() -> bool:
    """Whether this process runs one job of a Hydra multirun (``-m``)."""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
