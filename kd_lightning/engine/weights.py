"""Load a model's weights from a checkpoint file, strictly, with one-line errors.

A teacher is any ``nn.Module``. Its weights come from, in order of precedence, a checkpoint file
(``teacher.checkpoint``): a Lightning ``.ckpt`` of a kd_lightning run (or any ``.ckpt`` whose
``state_dict`` holds the model under one prefix), a plain state_dict (``.pt`` / ``.pth``, read with
``weights_only=True``) or a ``.safetensors`` file; or from whatever the ``_target_`` that built it
loaded itself (e.g. a pretrained-model factory).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from kd_lightning.engine.errors import ConfigError

log = logging.getLogger(__name__)

#: Prefixes under which a LightningModule may keep the model in its ``state_dict``.
_MODEL_PREFIXES = ("student.", "model.", "net.")


def freeze(model: nn.Module) -> nn.Module:
    """Put ``model`` in eval mode with every parameter frozen; returns it."""
    model.eval()
    model.requires_grad_(False)
    return model


@contextmanager
def in_mode(model: nn.Module, training: bool = False) -> Iterator[nn.Module]:
    """``model`` in training (``training``) or eval mode inside the block, its own mode restored after it, also
    when the block raises."""
    was_training = model.training
    model.train(training)
    try:
        yield model
    finally:
        model.train(was_training)


def read_state_dict(path: str | Path, key: str = "teacher.checkpoint") -> dict[str, torch.Tensor]:
    """Read a state_dict from ``.ckpt`` / ``.pt`` / ``.pth`` / ``.safetensors`` (``key`` names the
    config entry in error messages)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"{key}={path} does not exist; point it at a .ckpt/.pt/.pth/.safetensors file, "
            f"or set {key}=null to train the teacher"
        )
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as error:
            raise ConfigError(
                f"{key}={path} is not a readable .safetensors file ({str(error).splitlines()[0]}); "
                "point it at an intact checkpoint"
            ) from None
    if suffix not in {".ckpt", ".pt", ".pth"}:
        raise ConfigError(f"{key}={path}: unknown format '{suffix}'; use .ckpt, .pt, .pth or .safetensors")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ConfigError(
            f"{key}={path} could not be read as a checkpoint ({type(error).__name__}: "
            f"{str(error).splitlines()[0]}); pass a state_dict or Lightning checkpoint"
        ) from None
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise ConfigError(f"{key}={path} holds no state_dict of tensors; save model.state_dict()")
    return loaded


def model_keys(state: dict[str, torch.Tensor], expected: set[str] | None = None) -> dict[str, torch.Tensor]:
    """The model's own keys from a state_dict that may be a LightningModule's (``student.w`` -> ``w``): the
    state as it is if its keys are ``expected`` (a model whose own names start with ``model.``, e.g. a wrapped
    Hugging Face model), else without the first of :data:`_MODEL_PREFIXES` that some key carries."""
    if expected is not None and set(state) == expected:
        return state
    for prefix in _MODEL_PREFIXES:
        if any(name.startswith(prefix) for name in state):
            stripped = {name[len(prefix) :]: value for name, value in state.items() if name.startswith(prefix)}
            if expected is None or set(stripped) == expected or prefix != "model.":
                return stripped
    return state


def load_weights(
    model: nn.Module, path: str | Path, key: str = "teacher.checkpoint", keep_mismatched: bool = False
) -> nn.Module:
    """Load the checkpoint at ``path`` into ``model`` strictly, with a one-line error on mismatch.
    ``keep_mismatched``: parameters whose shape differs (e.g. a classifier head for another number of
    classes) keep their initial values instead (logged); missing or unexpected names are still refused."""
    expected = model.state_dict()
    state = model_keys(read_state_dict(path, key), set(expected))
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(name for name in set(expected) & set(state) if expected[name].shape != state[name].shape)
    if keep_mismatched and mismatched:
        log.info("%s=%s: kept the initial values of %s (shapes differ)", key, path, ", ".join(mismatched))
        state = {**state, **{name: expected[name] for name in mismatched}}
        mismatched = []
    if missing or unexpected or mismatched:
        detail = "; ".join(
            f"{label}: {', '.join(names[:4])}{' ...' if len(names) > 4 else ''}"
            for label, names in (("missing", missing), ("unexpected", unexpected), ("shape differs", mismatched))
            if names
        )
        raise ConfigError(
            f"{key}={path} does not fit the configured model ({detail}); point it at a checkpoint "
            "of this architecture or set the model config to the one it was trained with"
        )
    model.load_state_dict(state)
    return model
