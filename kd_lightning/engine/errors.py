"""Errors raised for bad user input, reported as one line naming the config key and the fix."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key and how to fix it."""


class TrainingDiverged(ConfigError):
    """The training loss (or a teacher's output) went non-finite; the message names the step, the parts
    and the settings to change. Reported like a :class:`ConfigError` (one line, non-zero exit, a failed
    sweep job)."""


def check_type(value: Any, types: type | tuple[type, ...], key: str) -> None:
    """Refuse ``value`` unless it is of ``types``; a bool is never accepted as a number (``alpha=true``)
    and a string never as a bool (``channels_last=maybe``)."""
    allowed = types if isinstance(types, tuple) else (types,)
    is_bool_as_number = isinstance(value, bool) and bool not in allowed
    if is_bool_as_number or not isinstance(value, allowed):
        names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
        raise ConfigError(f"{key}={value!r} must be {names}, not {type(value).__name__}; set {key} to a {names}")
