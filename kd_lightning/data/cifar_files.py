"""The CIFAR files as distributed: where each variant's pickle batches are, reading them safely, fetching them.

Layout under ``data.root`` (what the official archives unpack to)::

    cifar-10-batches-py/   data_batch_1 .. data_batch_5, test_batch, batches.meta
    cifar-100-python/      train, test, meta

Each batch file is a pickled dict with ``data`` (N x 3072 uint8, channel-major 32x32 images) and
``labels`` (CIFAR-10) or ``fine_labels`` / ``coarse_labels`` (CIFAR-100). The pickles are read with an
unpickler that admits nothing but NumPy arrays and plain containers, so a tampered file cannot run code.
Nothing is downloaded unless ``download: true``; the archive is then checked against its published MD5.
The datamodule that reads them is :class:`~kd_lightning.data.cifar.CIFARDataModule`.
"""

from __future__ import annotations

import hashlib
import io
import logging
import pickle
import shutil
import tarfile
import tempfile
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kd_lightning.engine.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CifarLayout:
    """Where one CIFAR variant's files are and what they hold."""

    folder: str
    train_files: tuple[str, ...]
    test_file: str
    meta_file: str
    url: str
    md5: str
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


LAYOUTS = {
    "cifar10": CifarLayout(
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        "test_batch",
        "batches.meta",
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "c58f30108f718f92721af3b95e74349a",
        10,
        (0.4914, 0.4822, 0.4465),
        (0.2470, 0.2435, 0.2616),
    ),
    "cifar100": CifarLayout(
        "cifar-100-python",
        ("train",),
        "test",
        "meta",
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "eb9058c3a382ffc7106e4002c42a8d85",
        100,
        (0.5071, 0.4867, 0.4408),
        (0.2675, 0.2565, 0.2761),
    ),
}

#: What the restricted unpickler lets a CIFAR pickle build: NumPy arrays and dtypes, and byte strings as
#: Python 3 pickles them (``_codecs.encode``), nothing else.
_ALLOWED_GLOBALS = {
    ("_codecs", "encode"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


class _ArraysOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"a CIFAR batch file may not reference {module}.{name}")


def read_batch(path: Path) -> dict[str, Any]:
    """One CIFAR pickle as a dict with str keys (the files are Python 2 pickles with byte-string keys)."""
    try:
        with open(path, "rb") as file:
            raw = _ArraysOnly(io.BytesIO(file.read()), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as error:
        raise ConfigError(f"data.root: {path} is not a readable CIFAR batch file ({error})") from None
    if not isinstance(raw, Mapping):
        raise ConfigError(f"data.root: {path} is not a CIFAR batch file (a pickled dict)")
    return {key.decode() if isinstance(key, bytes) else key: value for key, value in raw.items()}


def download_archive(url: str, md5: str, root: Path) -> None:
    """Fetch ``url`` (only when the config asked for it), check its MD5 and unpack it under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    log.info("data.download=true: fetching %s", url)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        archive = Path(tmp) / "archive.tar.gz"
        try:
            with urllib.request.urlopen(url, timeout=60) as response, open(archive, "wb") as out:
                shutil.copyfileobj(response, out)
        except OSError as error:
            raise ConfigError(
                f"data.download=true but {url} could not be fetched ({error}); place the files by hand"
            ) from None
        digest = hashlib.md5(archive.read_bytes()).hexdigest()
        if digest != md5:
            raise ConfigError(f"data.download: {url} has MD5 {digest}, not the published {md5}; not unpacked")
        with tarfile.open(archive) as tar:
            tar.extractall(root, filter="data")
