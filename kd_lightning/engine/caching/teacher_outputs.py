"""Teacher logits computed once per dataset split and reused: across epochs, runs and sweep jobs.

For data a sample index fully determines (no random augmentation) the teacher's logits are a fixed
table; distilling from the table skips the teacher forward entirely (the idea behind offline KD and
e.g. Shen & Xing, "A Fast Knowledge Distillation Framework for Visual Recognition", ECCV 2022, which
stores compressed top-k soft labels).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from kd_lightning.data.contract import CacheableData
from kd_lightning.engine.caching.store import array_record, open_array, publish_directory, weights_digest
from kd_lightning.engine.errors import ConfigError

log = logging.getLogger(__name__)

DTYPES = {"float16": np.float16, "float32": np.float32}


class TeacherOutputCache:
    r"""Per-split tables of teacher logits, looked up by dataset sample index.

    ``location="disk"`` writes each table under ``directory/<key>/`` (``.npy`` files read back
    memory-mapped, ``meta.json`` with their sha256, checked on every read; written to a temporary
    directory and renamed, so parallel sweep jobs never see half a table). ``key`` hashes the teacher's
    weights, the datamodule's :meth:`~CacheableData.content_identity`, the split and the storage
    format, so every job of a temperature x alpha sweep reuses the same tables and any change of
    teacher or data misses. ``location="memory"`` keeps the tables in this process only.

    ``dtype`` is the storage precision (``float16`` halves the size; lookups return float32).
    ``top_k`` keeps only the k largest log-probabilities per sample plus the tail mass
    :math:`m = 1 - \sum_{i \in \text{top-}k} p_i`; a lookup rebuilds log-probabilities with the tail
    spread evenly over the other :math:`C - k` classes,
    :math:`\log p_j = \log(m / (C - k))`. This is exact for the top-k probabilities and the tail's total
    at T = 1, an approximation at other temperatures.
    """

    def __init__(
        self,
        location: str = "disk",
        directory: str | None = None,
        dtype: str = "float16",
        top_k: int | None = None,
    ) -> None:
        if location not in ("disk", "memory"):
            raise ConfigError(f"teacher_cache.location={location!r}: use disk or memory (teacher_cache=none: no cache)")
        if location == "disk" and not directory:
            raise ConfigError(
                "teacher_cache=disk needs teacher_cache.directory (e.g. ${paths.cache_dir}/teacher_outputs)"
            )
        if dtype not in DTYPES:
            raise ConfigError(f"teacher_cache.dtype={dtype!r}: use one of {sorted(DTYPES)}")
        if top_k is not None and top_k < 1:
            raise ConfigError(f"teacher_cache.top_k={top_k} must be >= 1 (or null for every class)")
        self.location = location
        self.directory = Path(directory) if directory else None
        self.dtype = dtype
        self.top_k = top_k
        self.tables: dict[str, dict[str, np.ndarray]] = {}
        self.hits: dict[str, bool] = {}

    # ------------------------------------------------------------------------------------ build
    def prepare(self, teacher: nn.Module, data: CacheableData, splits: tuple[str, ...], device: torch.device) -> None:
        """Load (disk) or compute each split's table not loaded yet; compute = one teacher pass over the split."""
        splits = tuple(split for split in splits if split not in self.tables)
        teacher_digest = weights_digest(teacher) if splits else ""
        for split in splits:
            key = self.key(teacher_digest, data.content_identity(), split)
            entry = self.directory / key if self.directory else None
            table = self.read(entry) if self.location == "disk" else None
            self.hits[split] = table is not None
            if table is None:
                table = self.compute(teacher, data.ordered_dataloader(split), device)
                if entry is not None:
                    self.write(entry, table, {"split": split, "teacher": teacher_digest})
                    table = self.read(entry, verify=False)  # memory-mapped, like a later run's
            self.tables[split] = table

    def key(self, teacher_digest: str, identity: Mapping[str, Any], split: str) -> str:
        ingredients = {"teacher": teacher_digest, "data": identity, "split": split}
        ingredients |= {"dtype": self.dtype, "top_k": self.top_k, "format": 1}
        return hashlib.sha256(json.dumps(ingredients, sort_keys=True, default=str).encode()).hexdigest()[:20]

    @torch.inference_mode()
    def compute(self, teacher: nn.Module, loader: DataLoader, device: torch.device) -> dict[str, np.ndarray]:
        was_training = teacher.training
        teacher.eval()
        chunks: dict[str, list[np.ndarray]] = {}
        for batch in loader:
            x = batch[0] if isinstance(batch, (list, tuple)) else batch
            for name, array in self.encode(teacher(x.to(device)).float()).items():
                chunks.setdefault(name, []).append(array)
        teacher.train(was_training)
        return {name: np.concatenate(arrays) for name, arrays in chunks.items()}

    def encode(self, logits: Tensor) -> dict[str, np.ndarray]:
        """The stored form of a batch of logits: all of them, or top-k log-probabilities + log tail mass."""
        if self.top_k is None or self.top_k >= logits.shape[-1]:
            return {"logits": logits.cpu().numpy().astype(DTYPES[self.dtype])}
        log_probs = torch.log_softmax(logits, dim=-1)
        top, indices = log_probs.topk(self.top_k, dim=-1)
        tail = torch.log1p(-top.exp().sum(-1).clamp(max=1 - 1e-7))
        return {
            "top_log_probs": top.cpu().numpy().astype(DTYPES[self.dtype]),
            "top_indices": indices.cpu().numpy().astype(np.int32),
            "log_tail": tail.cpu().numpy().astype(np.float32),
            "num_classes": np.asarray([logits.shape[-1]], dtype=np.int64),
        }

    # ------------------------------------------------------------------------------------- disk
    def write(self, entry: Path, table: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{entry.name}."))
        files = {}
        for name, array in table.items():
            np.save(tmp / f"{name}.npy", array)
            files[name] = array_record(tmp / f"{name}.npy")
        (tmp / "meta.json").write_text(json.dumps({**meta, "files": files}, indent=2))
        publish_directory(tmp, entry)

    def read(self, entry: Path | None, verify: bool = True) -> dict[str, np.ndarray] | None:
        """The table at ``entry`` memory-mapped, or None if absent or (``verify``) failing its checksums
        (it is then deleted, to be rebuilt)."""
        if entry is None or not (entry / "meta.json").is_file():
            return None
        try:
            files = json.loads((entry / "meta.json").read_text())["files"]
            table = {name: open_array(entry / f"{name}.npy", record, verify) for name, record in files.items()}
        except (ValueError, KeyError, TypeError):
            table = {"meta.json": None}
        damaged = [name for name, array in table.items() if array is None]
        if damaged:
            log.warning("teacher-output cache %s is damaged (%s); rebuilding it", entry, damaged[0])
            shutil.rmtree(entry, ignore_errors=True)
            return None
        log.info("Reusing cached teacher outputs %s", entry)
        return table

    # ----------------------------------------------------------------------------------- lookup
    def logits(self, split: str, index: Tensor) -> Tensor:
        """Teacher logits (or log-probabilities, with ``top_k``) of samples ``index``, float32, on its device."""
        table = self.tables.get(split)
        if table is None:
            raise RuntimeError(f"teacher-output cache has no {split!r} split; call prepare() first")
        rows = index.cpu().numpy()
        if "logits" in table:
            return torch.from_numpy(np.asarray(table["logits"][rows], dtype=np.float32)).to(index.device)
        top = torch.from_numpy(np.asarray(table["top_log_probs"][rows], dtype=np.float32))
        ids = torch.from_numpy(np.asarray(table["top_indices"][rows], dtype=np.int64))
        log_tail = torch.from_numpy(np.asarray(table["log_tail"][rows], dtype=np.float32))
        num_classes = int(table["num_classes"][0])
        rest = log_tail - float(np.log(num_classes - ids.shape[-1]))
        full = rest.unsqueeze(-1).expand(-1, num_classes).clone().scatter_(-1, ids, top)
        return full.to(index.device)
