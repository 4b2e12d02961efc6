"""What may be instantiated from a file the library did not just compose: only allow-listed targets.

A run folder (``summary.json``), a cache or a sweep folder is *data*. A reader that rebuilds models from
a config stored there (``kd-report``) checks every ``_target_`` in it against an allow-list of module
prefixes first, so an edited file cannot make it call ``builtins.open``, ``torch.load`` or ``os.system``.
The default list covers the library's own models, data and what their configs use (``torch.nn``,
``torch.optim``); a user's own packages are added explicitly (``kd-report --allow-target my_pkg.``),
never by the file itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from kd_lightning.engine.errors import ConfigError

#: Module prefixes whose classes and factories a stored config may name.
DEFAULT_TRUSTED = (
    "kd_lightning.models.",
    "kd_lightning.data.",
    "kd_lightning.teacher_inputs.",  # the teacher input adapters (teacher.input): pure tensor transforms
    "kd_lightning.llm.models.",  # causal-LM and tokenizer factories (kd-llm-distill runs)
    "kd_lightning.llm.data.",
    "torch.nn.",
    "torch.optim.",
    "timm.",
    "torchvision.models.",
)


def targets(node: Any, path: str = "") -> Iterable[tuple[str, str]]:
    """Every ``(config path, _target_)`` in a plain (``OmegaConf.to_container``) config tree."""
    if isinstance(node, Mapping):
        if "_target_" in node:
            yield path or "<root>", str(node["_target_"])
        for key, value in node.items():
            yield from targets(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, Sequence) and not isinstance(node, (str, bytes)):
        for i, value in enumerate(node):
            yield from targets(value, f"{path}[{i}]")


def check_trusted(node: Any, source: str, trusted: Sequence[str] = DEFAULT_TRUSTED) -> None:
    """Refuse (naming the key and the file) any ``_target_`` outside the ``trusted`` module prefixes or
    naming a private / dunder attribute."""
    for key, target in targets(node):
        parts = target.split(".")
        if not target.startswith(tuple(trusted)) or any(part.startswith("_") for part in parts):
            raise ConfigError(
                f"{source}: {key}._target_={target} is not an allow-listed model or data factory "
                f"({', '.join(trusted)}); files in a run folder are data, not code: if you trust it, "
                "allow its package explicitly (kd-report --allow-target PREFIX)"
            )
