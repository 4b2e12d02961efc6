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

from kd_lightning.engine.errors import ConfigError


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


#: Suffix of an output key that names a module's input instead of its output (``fc:input``).
INPUT_SUFFIX = ":input"


class Taps:
    """Forward hooks on ``model`` at the given dotted paths; tensors are kept only inside :meth:`capture`.

    Args:
        model: any module (teacher or student).
        paths: output key -> config key that named it (for error messages). An output key is a dotted
            module path (that module's output) or ``<path>:input`` (the first positional input it
            receives, e.g. ``fc:input`` for the penultimate features of a classifier).

    Hooks record nothing outside a :meth:`capture` block, so no tensor outlives the step that
    produced it; :meth:`remove` detaches every hook. Hooks are picklable (``ddp_spawn``). A tapped
    module that runs more than once in one capture (a shared activation) raises a :class:`ConfigError`
    instead of silently keeping one of its calls.
    """

    def __init__(self, model: nn.Module, paths: Mapping[str, str]) -> None:
        self.keys = dict(paths)
        self._store: dict[str, Tensor] | None = None
        self._handles: list[RemovableHandle] = []
        for out_key, config_key in self.keys.items():
            is_input = out_key.endswith(INPUT_SUFFIX)
            path = out_key[: -len(INPUT_SUFFIX)] if is_input else out_key
            module = find_module(model, path, config_key)
            if is_input:
                self._handles.append(module.register_forward_pre_hook(partial(self._record_input, out_key)))
            else:
                self._handles.append(module.register_forward_hook(partial(self._record_output, out_key)))

    def _record_input(self, key: str, module: nn.Module, inputs: tuple[Any, ...]) -> None:
        self._keep(key, inputs[0] if inputs else None, "receives")

    def _record_output(self, key: str, module: nn.Module, inputs: Any, output: Any) -> None:
        self._keep(key, output, "outputs")

    def _keep(self, key: str, value: Any, verb: str) -> None:
        if self._store is None:
            return
        path = key.removesuffix(INPUT_SUFFIX)
        if not isinstance(value, Tensor):
            raise ConfigError(
                f"{self.keys[key]}={path!r} {verb} a {type(value).__name__}, not a tensor; "
                "tap a submodule that returns a single tensor"
            )
        if key in self._store:
            raise ConfigError(
                f"{self.keys[key]}={path!r} runs more than once in one forward pass (a module reused, e.g. "
                "one activation shared by several blocks), so its output is ambiguous; tap a module that "
                "runs once (or give the model one module per use)"
            )
        self._store[key] = value

    @contextmanager
    def capture(self) -> Iterator[dict[str, Tensor]]:
        """Yield a dict that the hooks fill during the forward pass run inside the block."""
        self._store = {}
        try:
            yield self._store
        finally:
            self._store = None

    def run(self, model: nn.Module, x: Any) -> tuple[Any, dict[str, Tensor]]:
        """``model(x)`` and the tensors tapped during it (without taps: the plain call, no capture block)."""
        if not self._handles:
            return model(x), {}
        with self.capture() as layers:
            return model(x), layers

    def remove(self) -> None:
        """Detach every hook; the model is as it was before."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __len__(self) -> int:
        return len(self._handles)
