"""Checkpoints without the frozen models (teachers are rebuilt from their configs, not re-trained)."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from lightning.fabric.plugins import TorchCheckpointIO
from torch import nn


class FrozenOutOfCheckpoints:
    """Mixin for a LightningModule whose :meth:`frozen_models` (name -> module, registered under that
    name) stay out of its checkpoints unless ``save_teacher``.

    Saving drops every ``<frozen name>.*`` entry; loading such a checkpoint puts the in-memory frozen
    weights back and checks that every other weight of the module is there. Call
    :meth:`configure_frozen_loading` once the frozen models are registered: frozen-less checkpoints then
    load non-strictly, because some strategies (FSDP) load weights before ``on_load_checkpoint`` can add them.
    """

    save_teacher: bool
    strict_loading: bool

    frozen_models: Callable[[], Mapping[str, nn.Module]]
    state_dict: Callable[[], dict[str, Any]]

    def _frozen_prefixes(self) -> tuple[str, ...]:
        return tuple(f"{name}." for name in self.frozen_models())

    def configure_frozen_loading(self) -> None:
        self.strict_loading = not self.frozen_models() or self.save_teacher

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        prefixes = self._frozen_prefixes()
        if prefixes and not self.save_teacher:
            checkpoint["state_dict"] = {
                name: value for name, value in checkpoint["state_dict"].items() if not name.startswith(prefixes)
            }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("state_dict")
        prefixes = self._frozen_prefixes()
        if not prefixes or state is None:  # FSDP loads (and removes) the weights before this hook
            return
        missing = [name for name in self.state_dict() if not name.startswith(prefixes) and name not in state]
        if missing:
            raise RuntimeError(f"the checkpoint lacks the weights {missing[:5]}: it is not a checkpoint of this model")
        for name, model in self.frozen_models().items():
            if not any(key.startswith(f"{name}.") for key in state):
                state.update({f"{name}.{key}": value for key, value in model.state_dict().items()})


class AtomicCheckpointIO(TorchCheckpointIO):
    """Saves a checkpoint into a temporary file beside the target and renames it over the target: a run
    killed while saving leaves the previous ``last.ckpt`` intact, whatever ``TMPDIR`` is (the temporary
    file is in the checkpoint's own directory, so the rename never crosses filesystems)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            super().save_checkpoint(checkpoint, tmp, storage_options)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
