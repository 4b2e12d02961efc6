"""What a checkpoint must carry beyond weights for a resumed run to equal the uninterrupted one."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def rng_states() -> dict[str, Any]:
    """The states of every random number generator a training step may draw from, as tensors and plain
    values only (checkpoints are read with ``weights_only=True``)."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    version, python_state, python_gauss = random.getstate()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(gauss)],
        "python": [version, list(python_state), python_gauss],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Put back what :func:`rng_states` recorded."""
    torch.set_rng_state(torch.as_tensor(states["torch"], dtype=torch.uint8))
    kind, keys, position, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), position, has_gauss, gauss))
    version, python_state, python_gauss = states["python"]
    random.setstate((version, tuple(python_state), python_gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class side_rng:
    """Context manager: whatever runs inside (filling a cache, a side fit) leaves every random number
    generator as it found it, so a run trains the same whether a cache was hit or missed."""

    def __enter__(self) -> side_rng:
        self.states = rng_states()
        return self

    def __exit__(self, *exc: object) -> None:
        set_rng_states(self.states)
