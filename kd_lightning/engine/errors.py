"""Errors raised for bad user input, reported as one line naming the config key and the fix."""

from __future__ import annotations

import math
from typing import Any


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key and how to fix it."""


class ModelConfigError(ConfigError):
    """A model builder's error (``kd_lightning.models``): the builder knows its keys only below its own config
    node, so its message writes them ``{model}.name``; :func:`~kd_lightning.engine.instantiate.build` puts in
    the node's key (``student.model.name``, ``teacher.model.name``), elsewhere they read ``model.name``.
    ``{weights}`` is where that node's local weights file goes: ``teacher.checkpoint`` for a teacher,
    ``student.model.weights`` for a student."""

    def __init__(self, template: str) -> None:
        self.template = template
        super().__init__(self.at("model"))

    def at(self, node: str) -> str:
        """The message for the model configured at ``node`` (``student.model``, ``method.teachers.t1.model``)."""
        if node == "model":
            weights = "teacher.checkpoint (a teacher) or student.model.weights (a student)"
        elif node.startswith("student") or not node.endswith(".model"):
            weights = f"{node}.weights"
        else:
            weights = f"{node.removesuffix('.model')}.checkpoint"
        return self.template.replace("{model}", node).replace("{weights}", weights)


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


def check_positive(value: Any, key: str, note: str = "", allow_none: bool = False) -> float | None:
    """``value`` as a float when it is a finite number > 0 (``None`` passes when ``allow_none``); else one line
    naming ``key``: ``{key}={value} must be > 0{note}``."""
    if value is None and allow_none:
        return None
    check_type(value, (int, float), key)
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{key}={value} must be > 0{note}")
    return float(value)


def check_fraction(value: Any, key: str, note: str = "") -> float:
    """``value`` as a float when it is a number in [0, 1]; else one line naming ``key``:
    ``{key}={value} is outside [0, 1]{note}``."""
    check_type(value, (int, float), key)
    if not 0.0 <= value <= 1.0:  # NaN fails too
        raise ConfigError(f"{key}={value} is outside [0, 1]{note}")
    return float(value)
