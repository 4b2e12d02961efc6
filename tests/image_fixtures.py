"""Tiny fake image datasets in the real on-disk formats: CIFAR python pickles and ImageNet-style class folders."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

CIFAR100_FOLDER = "cifar-100-python"
CIFAR10_FOLDER = "cifar-10-batches-py"


def _dump(path: Path, content: dict) -> None:
    path.write_bytes(pickle.dumps(content, protocol=2))


def write_cifar100(root: Path, train: int = 300, test: int = 100, seed: int = 0) -> dict[str, np.ndarray]:
    """``root/cifar-100-python/{train,test,meta}`` as distributed (dicts with byte-string keys, ``data`` N x 3072
    uint8, ``fine_labels`` / ``coarse_labels`` lists of ints); labels cycle so every class has samples. Returns
    the arrays written."""
    rng = np.random.default_rng(seed)
    folder = root / CIFAR100_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for name, count in (("train", train), ("test", test)):
        data = rng.integers(0, 256, (count, 3072), dtype=np.uint8)
        fine = [(i * 7 + seed) % 100 for i in range(count)]
        coarse = [label % 20 for label in fine]
        _dump(
            folder / name,
            {b"filenames": [b"x.png"] * count, b"data": data, b"fine_labels": fine, b"coarse_labels": coarse},
        )
        arrays[f"{name}_data"], arrays[f"{name}_fine"] = data, np.array(fine)
    _dump(
        folder / "meta",
        {
            b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"c{i}".encode() for i in range(20)],
        },
    )
    return arrays


def write_cifar10(root: Path, per_batch: int = 40, test: int = 50, seed: int = 0) -> dict[str, np.ndarray]:
    """``root/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}`` as distributed."""
    rng = np.random.default_rng(seed)
    folder = root / CIFAR10_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    train = []
    for batch in range(1, 6):
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [(i + batch) % 10 for i in range(per_batch)]
        _dump(folder / f"data_batch_{batch}", {b"batch_label": b"training batch", b"data": data, b"labels": labels})
        train.append(data)
    data = rng.integers(0, 256, (test, 3072), dtype=np.uint8)
    _dump(folder / "test_batch", {b"data": data, b"labels": [i % 10 for i in range(test)]})
    _dump(folder / "batches.meta", {b"label_names": [f"class{i}".encode() for i in range(10)]})
    return {"train_data": np.concatenate(train), "test_data": data}


def write_image_folder(root: Path, classes: int = 3, per_class: dict[str, int] | None = None, size: int = 40) -> Path:
    """``root/<split>/<class>/<i>.png`` (PIL), each class's images tinted differently so they are learnable."""
    from PIL import Image

    per_class = per_class or {"train": 8, "val": 3}
    rng = np.random.default_rng(0)
    for split, count in per_class.items():
        for c in range(classes):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 80, (size, size, 3), dtype=np.uint8)
                pixels[..., c % 3] += 150
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root
