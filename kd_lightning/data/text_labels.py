"""A text dataset's labels: class ids from int, ClassLabel or string labels (string labels numbered in the
sorted order of the training split's names), the transfer set's size, and the validation split drawn from the
labelled training rows when no validation file is given."""

from __future__ import annotations

from collections.abc import Mapping

import datasets
import numpy as np

from kd_lightning.data.text_sources import listing
from kd_lightning.engine.errors import ConfigError
from kd_lightning.losses.base import UNLABELLED


def encode_labels(
    rows: Mapping[str, datasets.Dataset], origins: Mapping[str, str], label_column: str, num_classes: int
) -> tuple[dict[str, np.ndarray], tuple[str, ...]]:
    """Every split's labels as int64 class ids (``-1``: unlabelled), checked against ``num_classes``
    (``data.num_classes``), and the class names by id: string labels numbered in sorted order, a ClassLabel's
    names, or ``"0"``, ``"1"``, ... for plain ints."""
    key = f"data.label_column={label_column!r}"
    feature = rows["train"].features[label_column]
    values = {split: list(dataset[label_column]) for split, dataset in rows.items()}
    for split, column in values.items():
        if None in column:
            raise ConfigError(
                f"{key} of {origins[split]} is empty in row {column.index(None)}; give every row a label "
                f"(int labels: {UNLABELLED} marks an unlabelled training row)"
            )
    if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
        names = tuple(sorted(set(values["train"])))
        ids = {name: i for i, name in enumerate(names)}
        labels = {}
        for split, column in values.items():
            unknown = next((v for v in column if str(v) not in ids), None)
            if unknown is not None:
                raise ConfigError(
                    f"{key} of {origins[split]} has the label {unknown!r}, which the training split lacks "
                    f"(its labels: {listing(names)})"
                )
            labels[split] = np.array([ids[str(v)] for v in column], dtype=np.int64)
        how = f"training labels {listing(names)}"
    elif isinstance(feature, datasets.ClassLabel) or (
        isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint"))
    ):
        try:
            labels = {split: np.asarray(column, dtype=np.int64) for split, column in values.items()}
        except (TypeError, ValueError):
            raise ConfigError(
                f"{key} holds ints in {origins['train']} but not in every split; use one kind of label"
            ) from None
        for split, ids in labels.items():
            if (ids < UNLABELLED).any():
                raise ConfigError(
                    f"{key} of {origins[split]} has the label {ids.min()}; labels are 0 .. num_classes - 1 "
                    f"({UNLABELLED}: unlabelled, training only)"
                )
            if split != "train" and (ids == UNLABELLED).any():
                raise ConfigError(
                    f"{key} of {origins[split]} has {int((ids == UNLABELLED).sum())} unlabelled rows (label "
                    f"{UNLABELLED}); only the training split may have them"
                )
        if isinstance(feature, datasets.ClassLabel):
            names, how = tuple(feature.names), f"the ClassLabel names {listing(feature.names)}"
        else:
            count = max((int(ids.max()) + 1 for ids in labels.values() if len(ids)), default=0)
            names, how = tuple(map(str, range(count))), f"labels 0 .. {count - 1}"
    else:
        raise ConfigError(
            f"{key} of {origins['train']} holds {feature} values; labels must be ints 0 .. num_classes - 1 "
            f"({UNLABELLED}: unlabelled) or strings"
        )
    found = len(names)
    if found != num_classes:
        raise ConfigError(
            f"data.num_classes={num_classes} but the data has {found} classes ({how}); set data.num_classes={found}"
        )
    return labels, names


def limit_unlabelled(
    rows: dict[str, datasets.Dataset], labels: dict[str, np.ndarray], transfer_samples: int | None
) -> None:
    """Keep the first ``transfer_samples`` unlabelled training rows (all of them when None)."""
    if transfer_samples is None:
        return
    unlabelled = np.flatnonzero(labels["train"] == UNLABELLED)
    if len(unlabelled) <= transfer_samples:
        return
    kept = np.setdiff1d(np.arange(len(labels["train"])), unlabelled[transfer_samples:])
    rows["train"], labels["train"] = rows["train"].select(kept), labels["train"][kept]


def split_validation(
    rows: dict[str, datasets.Dataset], labels: dict[str, np.ndarray], val_fraction: float, split_seed: int
) -> None:
    """Move ``val_fraction`` (``data.val_fraction``) of the labelled training rows (drawn with ``split_seed``)
    into ``val``; both keep their file order."""
    labelled = np.flatnonzero(labels["train"] != UNLABELLED)
    count = max(1, round(len(labelled) * val_fraction))
    if count >= len(labelled):
        raise ConfigError(
            f"data.val_fraction={val_fraction} of {len(labelled)} labelled training rows leaves none to "
            "train on; lower it or set data.val_file"
        )
    chosen = np.sort(np.random.default_rng(split_seed).permutation(labelled)[:count])
    kept = np.setdiff1d(np.arange(len(labels["train"])), chosen)
    train = rows["train"]
    rows["train"], rows["val"] = train.select(kept), train.select(chosen)
    labels["train"], labels["val"] = labels["train"][kept], labels["train"][chosen]
