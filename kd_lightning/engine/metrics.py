"""Which way a metric improves, declared once: losses, divergences, perplexity and calibration error are
better lower, everything else (accuracy, agreement) higher. Read by kd-sweep-report (the best job), the
Optuna sweeper's direction (``${metric_direction:${optimized_metric}}``) and summaries."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

#: A metric whose name (any ``/``-separated part) starts with one of these is better lower.
LOWER_IS_BETTER = ("loss", "kl", "ppl", "perplexity", "ece", "nll", "error", "nonfinite")


def lower_is_better(metric: str) -> bool:
    """Whether smaller values of ``metric`` are better (``val/loss``, ``val/kl_to_teacher``, ``test/ece``)."""
    return any(part.startswith(LOWER_IS_BETTER) for part in metric.lower().split("/"))


def direction(metric: str) -> str:
    """``minimize`` or ``maximize``: the optimisation direction of ``metric`` (an Optuna sweeper's)."""
    return "minimize" if lower_is_better(metric) else "maximize"


def best(records: Iterable[Any], metric: str, value: Any) -> Any:
    """The record of ``records`` with the best ``value(record)`` for ``metric`` (the first of ties; records
    whose value is None are skipped); None if there is none."""
    scored = [record for record in records if value(record) is not None]
    if not scored:
        return None
    pick = min if lower_is_better(metric) else max
    return pick(scored, key=value)
