"""Command-line spellings that changed: one line naming the new spelling instead of Hydra's composition
error (``kd-llm-distill llm/mode=on_policy`` is now ``llm/method=on_policy``; ``kd-distill
student=mobilenetv2`` is now ``student=cifar_mobilenetv2``)."""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Renames:
    """Old spellings of one command: ``table`` maps an old override (``key=value``, or a key prefix ending in
    ``.``) to its new spelling, ``see`` says where the new options live; ``gone`` maps a removed key to what
    replaces it; ``notes`` maps an override whose meaning changed to a line printed before the run (which
    then goes on) when one of the command's overrides starts with one of the note's ``when`` prefixes."""

    table: Mapping[str, str]
    see: str
    gone: Mapping[str, str] = field(default_factory=dict)
    notes: Mapping[str, tuple[tuple[str, ...], str]] = field(default_factory=dict)


LLM_RENAMED = Renames(
    table={
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
    },
    see="see conf/llm/method, conf/llm/teacher_cache",
    gone={"llm/mode": "llm/mode is gone; pick a scheme with llm/method (token_kd, on_policy, sft, ...)"},
)

#: The CIFAR-zoo networks whose names are also ImageNet architectures: their configs are ``cifar_<name>``.
CIFAR_NAMESAKES = (
    "resnet50",
    "mobilenetv2",
    "shufflenetv1",
    "shufflenetv2",
    "vgg8",
    "vgg11",
    "vgg13",
    "vgg16",
    "vgg19",
)

CLASSIFIER_RENAMED = Renames(
    table={
        f"{group}={name}": f"{group}=cifar_{name}"
        for group in ("teacher", "student")
        for name in CIFAR_NAMESAKES
        if f"{group}={name}" != "teacher=resnet50"  # now torchvision's ResNet-50 (a note below)
    },
    see="the CIFAR-zoo network; ImageNet-style torchvision ones are teacher=resnet50, student=resnet18, "
    "student=mobilenet_v3 or <group>=torchvision <group>.model.name=<name>",
    notes={
        "teacher=resnet50": (
            ("data=cifar",),
            "teacher=resnet50 is torchvision's ImageNet-style ResNet-50 (a 7x7 stride-2 stem for 224 px images); "
            "the CIFAR-zoo ResNet-50 of the CRD / DKD tables is teacher=cifar_resnet50",
        )
    },
)


def renamed(override: str, renames: Renames) -> str | None:
    """The message for an override spelled the old way, or None."""
    bare = override.lstrip("+~")
    key = bare.split("=", 1)[0]
    for old, new in renames.table.items():
        if bare == old or key == old or key.startswith(f"{old}."):
            return f"{bare} is spelled {new} now ({renames.see})"
    for old, message in renames.gone.items():
        if key in (old, old.replace("/", ".")) or key.startswith(f"{old.replace('/', '.')}."):
            return f"{bare}: {message}"
    return None


def exit_on_renamed(program: str, argv: Sequence[str], renames: Renames) -> None:
    """Exit 2 with one line if an override of ``argv`` is spelled the old way; print the note of an override
    whose meaning changed (when its context is on the command line)."""
    for override in argv:
        message = renamed(override, renames)
        if message is not None:
            print(f"{program}: error: {message}", file=sys.stderr)
            raise SystemExit(2)
    for override, (when, note) in renames.notes.items():
        if override in argv and any(arg.startswith(prefix) for arg in argv for prefix in when):
            print(f"{program}: note: {note}", file=sys.stderr)
