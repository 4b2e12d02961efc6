"""The content-addressed store under every cache: keys, digests, verified arrays, atomic publishing.

A key is the hash of everything that determines the result (resolved model, data and fit configs,
teacher weights, seed), so any later run with the same ingredients reuses it, and a changed ingredient
misses. Entries are written to a temporary directory and renamed into place, so parallel sweep jobs may
share a cache; array files are recorded with their sha256 and shape and checked when opened. Used by
the trained-teacher and scratch-baseline caches and by both teacher-output caches (classifier logits,
LM top-k token log-probabilities).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import inspect
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from kd_lightning.engine.errors import ConfigError

log = logging.getLogger(__name__)

#: Data settings that change how data is served, not what a supervised fit (a teacher, a scratch baseline:
#: the keys' users) learns from it; those fits never see the transfer set nor the augmentation.
DATA_KEYS_IGNORED = ("data_dir", "num_workers", "pin_memory", "transfer_samples", "return_index", "augment")


#: Trainer settings that change logging or placement of outputs, not the trained weights.
TRAINER_KEYS_IGNORED = (
    "default_root_dir",
    "enable_progress_bar",
    "enable_model_summary",
    "log_every_n_steps",
    "max_epochs",
    "callbacks",
    "logger",
    "enable_checkpointing",
)


def trainer_identity(trainer_cfg: DictConfig) -> dict[str, Any]:
    """The resolved trainer config without logging-only keys (epochs are keyed separately)."""
    trainer = OmegaConf.to_container(trainer_cfg, resolve=True)
    return {key: value for key, value in trainer.items() if key not in TRAINER_KEYS_IGNORED}


def data_identity(data_cfg: DictConfig) -> dict[str, Any]:
    """The resolved data config without serving-only keys."""
    data = OmegaConf.to_container(data_cfg, resolve=True)
    return {key: value for key, value in data.items() if key not in DATA_KEYS_IGNORED}


def cache_key(**parts: Any) -> str:
    """A short stable hash of JSON-serialisable (or OmegaConf) ingredients."""
    plain = {
        name: OmegaConf.to_container(part, resolve=True) if OmegaConf.is_config(part) else part
        for name, part in parts.items()
    }
    return hashlib.sha256(json.dumps(plain, sort_keys=True, default=str).encode()).hexdigest()[:16]


@contextlib.contextmanager
def disk_writes(target: Path, temporary: Path | None = None) -> Iterator[None]:
    """Writes to ``target``: a full disk (or quota) is one :class:`ConfigError` naming the directory, and the
    ``temporary`` file or directory being written is removed (the published entries are never touched)."""
    try:
        yield
    except OSError as error:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True) if temporary.is_dir() else temporary.unlink(missing_ok=True)
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ConfigError(
                f"no space left on the disk of {target.parent} while writing {target.name}; free space there or "
                "point paths.cache_dir / hydra.run.dir to another disk"
            ) from None
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file in ``path``'s directory and rename it over ``path``: a reader (or a
    crash) never sees half a file, and a full disk leaves no temporary file (:func:`disk_writes`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with disk_writes(path, Path(name)):
        with os.fdopen(handle, "w") as tmp:
            tmp.write(text)
        os.replace(name, path)


def write_safetensors_atomic(path: Path, tensors: dict[str, Any]) -> None:
    """Save ``tensors`` (name -> tensor, made contiguous) as a safetensors file at ``path`` through a temporary
    file renamed over it, as :func:`write_text_atomic` does: never half a file, no temporary left on a full disk."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".safetensors")
    os.close(handle)
    with disk_writes(path, Path(name)):
        save_file({key: tensor.contiguous() for key, tensor in tensors.items()}, name)
        os.replace(name, path)


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True, default=str))


def payload_digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def write_verified_json(path: Path, payload: dict[str, Any]) -> None:
    """A JSON cache entry with the sha256 of its own content, checked by :func:`read_verified_json`."""
    write_json_atomic(path, {"payload": payload, "sha256": payload_digest(payload)})


def read_verified_json(path: Path) -> dict[str, Any] | None:
    """The payload of a :func:`write_verified_json` entry; None if absent, or damaged (unreadable JSON or a
    checksum that does not match: then a warning, and the entry is removed to be rebuilt)."""
    if not path.is_file():
        return None
    try:
        entry = json.loads(path.read_text())
        if entry["sha256"] == payload_digest(entry["payload"]):
            return entry["payload"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        pass
    log.warning("cache entry %s is damaged; rebuilding it", path)
    path.unlink(missing_ok=True)
    return None


def code_digest(model: nn.Module) -> str:
    """sha256 of what a model's code and layout are: the source files of every class in it outside torch
    (so editing the model's code misses a cache keyed on its config alone) and its state-dict layout."""
    digest = hashlib.sha256()
    files = set()
    for module in model.modules():
        cls = type(module)
        digest.update(f"{cls.__module__}.{cls.__qualname__}".encode())
        if not cls.__module__.startswith("torch."):
            with contextlib.suppress(TypeError, OSError):
                files.add(inspect.getsourcefile(cls))
    for name in sorted(f for f in files if f):
        digest.update(Path(name).read_bytes())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
    return digest.hexdigest()[:16]


def weights_digest(model: nn.Module) -> str:
    """sha256 of the model's class and state (names, dtypes, shapes and bytes of every tensor)."""
    digest = hashlib.sha256(type(model).__qualname__.encode())
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


#: Content digests of the files a run read, by (path, size, mtime): each file is hashed once per process.
_FILE_DIGESTS: dict[tuple[str, int, int], str] = {}
#: Keys of a model config that name local files its weights come from.
WEIGHT_FILE_KEYS = ("path", "weights")


def path_digest(path: str | Path) -> str:
    """sha256 over a file's bytes, or over every file of a directory (relative name and bytes, in name order);
    remembered per (path, size, mtime) so a file is read once per run."""
    root = Path(path).expanduser()
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    digest = hashlib.sha256()
    for file in files:
        stat = file.stat()
        memo = (str(file.resolve()), stat.st_size, stat.st_mtime_ns)
        if memo not in _FILE_DIGESTS:
            _FILE_DIGESTS[memo] = file_digest(file)
        digest.update(f"{file.relative_to(root) if root.is_dir() else file.name}:{_FILE_DIGESTS[memo]}".encode())
    return digest.hexdigest()


def weight_files(model_cfg: Any) -> dict[str, str]:
    """``{config key: path}`` of the local files a model config takes its weights from (``path``, ``weights``)."""
    get = getattr(model_cfg, "get", None)
    if get is None:
        return {}
    return {key: str(get(key)) for key in WEIGHT_FILE_KEYS if get(key) and Path(str(get(key))).expanduser().exists()}


def weight_files_digest(model_cfg: Any) -> dict[str, str]:
    """:func:`path_digest` of each of the model config's weight files: what a cache key must cover."""
    return {key: path_digest(path) for key, path in weight_files(model_cfg).items()}


def publish_directory(tmp: Path, entry: Path) -> None:
    """Rename the fully written ``tmp`` to ``entry`` (atomic); if another job published ``entry`` first,
    keep theirs (same key, same content) and drop ``tmp``."""
    try:
        os.replace(tmp, entry)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)


def array_record(path: Path) -> dict[str, Any]:
    """What ``meta.json`` records of an ``.npy`` file: its sha256 and shape."""
    return {"sha256": file_digest(path), "shape": list(np.load(path, mmap_mode="r").shape)}


def open_array(path: Path, record: dict[str, Any], verify: bool = True) -> np.ndarray | None:
    """The ``.npy`` file at ``path`` memory-mapped, or None if it is missing, has another shape than
    ``record`` says or (``verify``) another sha256."""
    if not path.is_file() or (verify and file_digest(path) != record["sha256"]):
        return None
    array = np.load(path, mmap_mode="r")
    return array if list(array.shape) == list(record["shape"]) else None
