"""Capture intermediate outputs of any ``nn.Module`` by dotted module path, with forward hooks.

The idea is torchdistill's: features are named in the config (``features.2``, ``layer3``,
``blocks.11.mlp``) instead of rewriting models to return them, so it works on models this library
did not define.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import partial
from typing import Any

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from kd_lightning.errors import ConfigError


def find_module(model: nn.Module, path: str, key: str) -> nn.Module:
    """``model``'s submodule at dotted ``path``; a :class:`ConfigError` naming ``key`` and the nearest names if none."""
    names = {name: module for name, module in model.named_modules() if name}
    if path in names:
        return names[path]
    near = difflib.get_close_matches(path, list(names), n=5, cutoff=0.5) or sorted(names)[:8]
    raise ConfigError(
        f"{key}={path!r} is not a module of {type(model).__name__}; nearest valid names: {near} "
        f"(set {key} to one of the dotted names of model.named_modules())"
    )


class Taps:
    """Forward hooks on ``model`` at the given dotted paths; outputs are kept only inside :meth:`capture`.

    Args:
        model: any module (teacher or student).
        paths: dotted module path -> config key that named it (for error messages).

    Hooks record nothing outside a :meth:`capture` block, so no tensor outlives the step that
    produced it; :meth:`remove` detaches every hook. Hooks are picklable (``ddp_spawn``).
    """

    def __init__(self, model: nn.Module, paths: Mapping[str, str]) -> None:
        self.keys = dict(paths)
        self._store: dict[str, Tensor] | None = None
        self._handles: list[RemovableHandle] = [
            find_module(model, path, key).register_forward_hook(partial(self._record, path))
            for path, key in self.keys.items()
        ]

    def _record(self, path: str, module: nn.Module, inputs: Any, output: Any) -> None:
        if self._store is None:
            return
        if not isinstance(output, Tensor):
            raise ConfigError(
                f"{self.keys[path]}={path!r} outputs a {type(output).__name__}, not a tensor; "
                "tap a submodule that returns a single tensor"
            )
        self._store[path] = output

    @contextmanager
    def capture(self) -> Iterator[dict[str, Tensor]]:
        """Yield a dict that the hooks fill during forward passes run inside the block."""
        self._store = {}
        try:
            yield self._store
        finally:
            self._store = None

    def remove(self) -> None:
        """Detach every hook; the model is as it was before."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __len__(self) -> int:
        return len(self._handles)
