"""Command-line spellings that changed: one line naming the new spelling instead of Hydra's composition
error (``kd-llm-distill llm/mode=on_policy`` is now ``llm/method=on_policy``)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

#: old override (``key=value`` or a key prefix ending in ``.``) -> its new spelling.
LLM_RENAMED = {
    "llm/mode=off_policy": "llm/method=token_kd",
    "llm/mode=on_policy": "llm/method=on_policy",
    "llm/mode=teacher_cache": "llm/teacher_cache=top_k",
    "llm/loss=sft": "llm/method=sft",
    "llm/loss=distillm2": "llm/method=distillm2",
    "llm.mode.lmbda": "llm.method.lmbda",
    "llm.mode.generation": "llm.method.generation",
    "llm.mode.top_k": "llm.teacher_cache.top_k",
    "llm.loss.skew": "llm.method.loss.skew (with llm/method=distillm2)",
    "llm.loss.student_weight": "llm.method.loss.student_weight (with llm/method=distillm2)",
    "llm.loss.generation": "llm.method.generation (with llm/method=distillm2)",
}


def renamed(override: str, table: dict[str, str]) -> str | None:
    """The message for an override spelled the old way, or None."""
    bare = override.lstrip("+~")
    key = bare.split("=", 1)[0]
    for old, new in table.items():
        if bare == old or key == old or key.startswith(f"{old}."):
            return f"{bare} is spelled {new} now (see conf/llm/method, conf/llm/teacher_cache)"
    if key in ("llm/mode", "llm.mode") or key.startswith("llm.mode."):
        return f"{bare}: llm/mode is gone; pick a scheme with llm/method (token_kd, on_policy, sft, ...)"
    return None


def exit_on_renamed(program: str, argv: Sequence[str], table: dict[str, str]) -> None:
    """Exit 2 with one line if an override of ``argv`` is spelled the old way."""
    for override in argv:
        message = renamed(override, table)
        if message is not None:
            print(f"{program}: error: {message}", file=sys.stderr)
            raise SystemExit(2)
