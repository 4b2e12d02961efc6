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
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from kd_lightning.data.contract import CacheableData, check_cacheable
from kd_lightning.engine.batches import Inputs, to_device
from kd_lightning.engine.caching.store import (
    array_record,
    disk_writes,
    open_array,
    publish_directory,
    weights_digest,
)
from kd_lightning.engine.errors import ConfigError
from kd_lightning.engine.weights import in_mode
from kd_lightning.teacher.lookup import DeviceTables, spread_tail
from kd_lightning.teacher.shards import gather_shards, shard_of

if TYPE_CHECKING:
    from lightning.pytorch import Trainer

log = logging.getLogger(__name__)

DTYPES = {"float16": np.float16, "float32": np.float32}

#: Arrays of a table that hold one value for the whole table, not one row per sample.
WHOLE_TABLE = ("num_classes",)


class TeacherOutputCache:
    r"""Per-split tables of teacher logits, looked up by dataset sample index.

    ``location="disk"`` writes each table under ``directory/<key>/`` (``.npy`` files read back
    memory-mapped, ``meta.json`` with their sha256, checked on every read; written to a temporary
    directory and renamed, so parallel sweep jobs never see half a table). ``key`` hashes the teacher's
    weights, the datamodule's :meth:`~CacheableData.content_identity`, the split and the storage
    format, so every job of a temperature x alpha sweep reuses the same tables and any change of
    teacher or data misses. ``location="memory"`` keeps the tables in this process only.

    Under a multi-process strategy every process labels its own shard of each split and the shards are
    gathered into the one table (see :meth:`prepare`); ``labelled_rows[split]`` is how many rows this
    process ran the teacher on (0 for a disk hit).

    Lookups in memory tables run on the device (each table is copied there once, in :meth:`prepare`; on the
    CPU the tensors share the arrays' memory): no host read per training step. Disk tables are memory-mapped
    and read by row on the host, so their lookups copy the batch's indices to the host.

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
        self.labelled_rows: dict[str, int] = {}
        self.device_tables = DeviceTables(skip=WHOLE_TABLE)  #: memory tables (and views) on the device

    def check_data(self, datamodule: object) -> None:
        """Refuse data whose per-sample outputs cannot be stored (random augmentation: ``per_view`` can)."""
        check_cacheable(datamodule, "teacher_cache")

    def start_epoch(self, epoch: int) -> None:
        """Called as each training epoch starts; the tables here do not depend on it."""

    # ------------------------------------------------------------------------------------ build
    def prepare(
        self,
        teacher: nn.Module,
        data: CacheableData,
        splits: tuple[str, ...],
        device: torch.device,
        trainer: Trainer | None = None,
    ) -> None:
        """Load (disk) or compute each split's table not loaded yet; compute = one teacher pass over the split.

        With a ``trainer`` of more than one process (its strategy live: called during a fit) every process
        runs this, and a disk entry is a hit only if every process reads it (they all agree, and none runs
        the teacher). On a miss each process labels its shard of the split and the shards are gathered
        into the table one process's pass gives, bit for bit (:meth:`compute_sharded`); global rank 0
        writes it to disk; after a barrier every process reads the published entry memory-mapped (a
        process that does not see it, on a disk of its own, writes its own copy)."""
        splits = tuple(split for split in splits if split not in self.tables)
        teacher_digest = weights_digest(teacher) if splits else ""
        for split in splits:
            self.prepare_split(teacher, teacher_digest, data, split, device, trainer)
            if self.location == "memory":
                self.device_tables.on(self.tables[split], device)

    def prepare_split(
        self,
        teacher: nn.Module,
        teacher_digest: str,
        data: CacheableData,
        split: str,
        device: torch.device,
        trainer: Trainer | None,
    ) -> None:
        """One split's table into ``tables[split]`` (and ``hits``, ``labelled_rows``), as :meth:`prepare` says;
        ``teacher_digest``: :func:`weights_digest` of ``teacher``, computed once by the caller."""
        world = trainer.world_size if trainer is not None else 1
        key = self.key(teacher_digest, data.content_identity(), split)
        entry = self.directory / key if self.directory else None
        table = self.read(entry) if self.location == "disk" else None
        if world > 1:
            hit = torch.tensor([int(table is not None)], device=trainer.strategy.root_device)
            table = table if bool(trainer.strategy.all_gather(hit).all()) else None
        self.hits[split] = table is not None
        self.labelled_rows[split] = 0
        if table is None:
            loader = data.ordered_dataloader(split)
            if world > 1:
                table, self.labelled_rows[split] = self.compute_sharded(teacher, loader, device, trainer)
            else:
                table, self.labelled_rows[split] = self.compute(teacher, loader, device), len(loader.dataset)
            if entry is not None:
                meta = {"split": split, "teacher": teacher_digest}
                if world == 1 or trainer.global_rank == 0:
                    self.write(entry, table, meta)
                if world > 1:
                    trainer.strategy.barrier("teacher_cache")
                published = self.read(entry, verify=False)  # memory-mapped, like a later run's
                if published is None:
                    self.write(entry, table, meta)
                    published = self.read(entry, verify=False)
                table = published
        self.tables[split] = table

    def key(self, teacher_digest: str, identity: Mapping[str, Any], split: str) -> str:
        ingredients = {"teacher": teacher_digest, "data": identity, "split": split}
        ingredients |= {"dtype": self.dtype, "top_k": self.top_k, "format": 1}
        return hashlib.sha256(json.dumps(ingredients, sort_keys=True, default=str).encode()).hexdigest()[:20]

    @torch.inference_mode()
    def compute(self, teacher: nn.Module, loader: DataLoader, device: torch.device) -> dict[str, np.ndarray]:
        chunks: dict[str, list[np.ndarray]] = {}
        with in_mode(teacher):
            for batch in loader:
                for name, array in self.encode(teacher(self.teacher_input(batch, device)).float()).items():
                    chunks.setdefault(name, []).append(array)
        return {name: arrays[0] if name in WHOLE_TABLE else np.concatenate(arrays) for name, arrays in chunks.items()}

    def teacher_input(self, batch: Any, device: torch.device) -> Inputs:
        """The input the teacher labels for a batch of the ordered loader: its ``x`` (a tensor or a mapping of
        tensors), on ``device``."""
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        return to_device(x, device)

    def compute_sharded(
        self, teacher: nn.Module, loader: DataLoader, device: torch.device, trainer: Trainer
    ) -> tuple[dict[str, np.ndarray], int]:
        """The table of ``loader`` computed by all of ``trainer``'s processes together, and how many rows
        this process labelled: :meth:`compute` on this process's :func:`~kd_lightning.teacher.shards.shard_of`
        the loader, joined by :func:`~kd_lightning.teacher.shards.gather_shards`."""
        part, size = shard_of(loader, trainer.world_size, trainer.global_rank)
        shard = self.compute(teacher, part, device)
        return gather_shards(shard, size, len(loader.dataset), trainer, WHOLE_TABLE), len(part.dataset)

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
        with disk_writes(entry, tmp):
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
        if verify:  # a hit (the unverified read is of a table this run just wrote)
            log.info("Reusing cached teacher outputs %s", entry)
        return table

    # ----------------------------------------------------------------------------------- lookup
    def logits(self, split: str, index: Tensor) -> Tensor:
        """Teacher logits (or log-probabilities, with ``top_k``) of samples ``index``, float32, on its device."""
        table = self.tables.get(split)
        if table is None:
            raise RuntimeError(f"teacher-output cache has no {split!r} split; call prepare() first")
        if self.location == "memory":  # on the device: no host read
            tensors, rows = self.device_tables.on(table, index.device), index.long()
            if "logits" in tensors:
                return tensors["logits"][rows].float()
            top, ids = tensors["top_log_probs"][rows].float(), tensors["top_indices"][rows].long()
            return spread_tail(top, ids, tensors["log_tail"][rows].float(), int(table["num_classes"][0]))
        rows = index.cpu().numpy()
        if "logits" in table:
            return torch.from_numpy(np.asarray(table["logits"][rows], dtype=np.float32)).to(index.device)
        top = torch.from_numpy(np.asarray(table["top_log_probs"][rows], dtype=np.float32))
        ids = torch.from_numpy(np.asarray(table["top_indices"][rows], dtype=np.int64))
        log_tail = torch.from_numpy(np.asarray(table["log_tail"][rows], dtype=np.float32))
        return spread_tail(top, ids, log_tail, int(table["num_classes"][0])).to(index.device)
