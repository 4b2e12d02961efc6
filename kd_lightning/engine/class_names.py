"""Classes that line up: a model that names its classes (a Hugging Face config's ``id2label``) against the
data's class names (string labels are numbered in the sorted order of their names; image folders sort theirs).

A model trained elsewhere numbers its classes its own way. When both sides name them, the names decide:

- the same names in the same order (case aside): nothing to do;
- the same names in another order: the model's logits are reordered into the data's order
  (``model.class_order``; the run logs both orders);
- other names: refused, one line showing both, before anything trains.

Models that name no classes (the zoo, timm / torchvision heads, a Hugging Face config with the default
``LABEL_0``, ``LABEL_1``, ... names) and data without names (MNIST-1D, digits) are not compared.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from kd_lightning.engine.errors import ConfigError

log = logging.getLogger(__name__)
#: transformers' names for classes nobody named.
DEFAULT_NAME = re.compile(r"LABEL_\d+")


def data_class_names(datamodule: Any) -> list[str] | None:
    """The data's class names in label order (a text datamodule's ``label_names``, an image folder's
    ``class_names``, CIFAR's), or None when the data names none (or only numbers them: ``0``, ``1``, ...)."""
    names = getattr(datamodule, "label_names", None) or getattr(datamodule, "class_names", None)
    names = [str(name) for name in names] if names else None
    return None if not names or all(name.isdigit() for name in names) else names


def model_class_names(model: nn.Module) -> list[str] | None:
    """The class names a model carries (``class_names``: a Hugging Face classifier's ``id2label``), or None."""
    names = getattr(model, "class_names", None)
    if not names or all(DEFAULT_NAME.fullmatch(str(name)) for name in names):
        return None
    return [str(name) for name in names]


def align_classes(models: Mapping[str, nn.Module], data_names: Sequence[str] | None) -> None:
    """Match each model's class names (by config key, e.g. ``teacher``) with the data's: reorder a model's
    logits into the data's order (sets ``class_order``), or raise a one-line :class:`ConfigError`."""
    if not data_names:
        return
    wanted = [name.casefold() for name in data_names]
    for key, model in models.items():
        names = model_class_names(model)
        if names is None:
            continue
        own = [name.casefold() for name in names]
        if own == wanted:
            continue
        if sorted(own) == sorted(wanted) and len(set(own)) == len(own):
            model.class_order = [own.index(name) for name in wanted]
            log.info(
                "%s: the model orders its classes %s (config.id2label), the data %s: its logits are reordered to "
                "the data's order",
                key,
                names,
                list(data_names),
            )
            continue
        raise ConfigError(
            f"{key}.model names its classes {names} (config.id2label) but the data's classes are "
            f"{list(data_names)} (label order): they must be the same names; rename the data's labels to the "
            f"model's, or give {key}.model.config.id2label the data's names if the model's are wrong"
        )
