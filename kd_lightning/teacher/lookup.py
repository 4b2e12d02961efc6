"""Stored per-sample tables (teacher outputs, view parameters) looked up on the device, without host reads."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor


class DeviceTables:
    """Tables of per-row numpy arrays as tensors on a device, copied once per table and device (on the CPU
    the tensors share the arrays' memory; a read-only, memory-mapped array is copied). Indexing them with a
    device tensor of row indices needs no host read, where indexing the arrays needs the indices on the host
    (a device-to-host copy, which makes the host wait for the accelerator)."""

    def __init__(self, skip: tuple[str, ...] = ()) -> None:
        self.skip = skip  #: arrays that are not per row (left out)
        self.held: dict[tuple[int, torch.device], tuple[Mapping[str, np.ndarray], dict[str, Tensor]]] = {}

    def on(self, table: Mapping[str, np.ndarray], device: torch.device | str) -> dict[str, Tensor]:
        """``table``'s per-row arrays as tensors on ``device``."""
        key = (id(table), torch.device(device))
        held = self.held.get(key)
        if held is None or held[0] is not table:  # the table object is kept, so its id stays its own
            arrays = {name: np.asarray(a) for name, a in table.items() if name not in self.skip}
            tensors = {name: torch.from_numpy(a if a.flags.writeable else np.array(a)) for name, a in arrays.items()}
            held = self.held[key] = (table, {name: t.to(device) for name, t in tensors.items()})
        return held[1]


def spread_tail(top: Tensor, ids: Tensor, log_tail: Tensor, num_classes: int) -> Tensor:
    """Log-probabilities over ``num_classes``: ``top`` at ``ids``, the tail mass ``exp(log_tail)`` spread evenly
    over the other classes."""
    rest = log_tail - float(np.log(num_classes - ids.shape[-1]))
    return rest.unsqueeze(-1).expand(-1, num_classes).clone().scatter_(-1, ids, top)
