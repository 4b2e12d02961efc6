r"""The teacher-output cache for randomly augmented training data: views stored once, replayed each epoch.

Shen & Xing, "A Fast Knowledge Distillation Framework for Visual Recognition" (FKD, ECCV 2022): instead of
running the teacher on every freshly augmented batch, store, for :math:`E` views of every training sample,
the view's augmentation parameters and the teacher's soft labels on that view; training replays them. The
teacher then costs one pass per view, once, shared by every later run and sweep job, and augmentation is
kept (function matching's consistent teaching, Beyer et al. 2022, with a finite set of views).

View :math:`v \in \{0, \dots, E - 1\}` of training sample :math:`i` is
:math:`x^{(v)}_i = A(x_i; \theta_{v,i})`, with :math:`\theta_{v,i}` the augmentation's random values for that
sample, drawn in index order from a generator seeded with ``(seed, v)``. Epoch :math:`t` trains on view
:math:`v = t \bmod E`: the datamodule rebuilds :math:`x^{(v)}_i` from the stored :math:`\theta_{v,i}` (the
very input the teacher labelled, bit for bit: the same deterministic :math:`A` on the same values) and the
lookup returns the teacher's stored outputs for :math:`(v, i)`. Validation and test are not augmented: their
tables are :class:`~kd_lightning.teacher.outputs.TeacherOutputCache`'s.

Two entries per teacher on disk: the views (the parameters, keyed by the data's content identity, ``views``
and ``seed``; shared by every teacher, so several teachers label the same views) and the teacher's outputs
on them (keyed by its weights and the views' key). Both are verified by checksum like every table.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from kd_lightning.data.contract import CacheableData, ReplaysViews, check_view_replay
from kd_lightning.engine.caching.store import cache_key, weights_digest
from kd_lightning.engine.errors import ConfigError
from kd_lightning.teacher.outputs import TeacherOutputCache

if TYPE_CHECKING:
    from lightning.pytorch import Trainer

#: The augmented split; the others are stored as plain tables.
TRAIN = "train"


class TeacherViewCache(TeacherOutputCache):
    """:class:`TeacherOutputCache` for data with random augmentation (``teacher_cache=per_view``): ``views``
    stored augmented views per training sample, epoch ``t`` replaying view ``t % views`` (see the module
    docstring). ``seed`` seeds the views' parameters; the other arguments are the base class's."""

    def __init__(self, views: int = 8, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if isinstance(views, bool) or not isinstance(views, int) or views < 1:
            raise ConfigError(f"teacher_cache.views={views!r} must be an integer >= 1 (stored views per sample)")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"teacher_cache.seed={seed!r} must be an integer")
        self.views = views
        self.seed = seed
        self.view = 0
        self.labelling: int | None = None  #: the view being labelled (during :meth:`prepare`)
        self.augment: Any = None
        self.view_params: dict[str, np.ndarray] = {}
        self.view_tables: list[dict[str, np.ndarray]] = []
        self.views_key = ""

    def check_data(self, datamodule: object) -> None:
        check_view_replay(datamodule, "teacher_cache=per_view")

    # ------------------------------------------------------------------------------------ build
    def prepare(
        self,
        teacher: nn.Module,
        data: ReplaysViews,
        splits: tuple[str, ...],
        device: torch.device,
        trainer: Trainer | None = None,
    ) -> None:
        """The plain tables of the unaugmented splits; for ``train``, the views (read, or drawn) and the
        teacher's outputs on each (read, or computed like any split: every process labels its shard); then
        ``data`` replays them."""
        plain = [split for split in splits if split != TRAIN and split not in self.tables]
        views = TRAIN in splits and not self.view_tables
        if views:
            self.check_data(data)
        digest = weights_digest(teacher) if plain or views else ""
        for split in plain:
            self.prepare_split(teacher, digest, data, split, device, trainer)
            if self.location == "memory":
                self.device_tables.on(self.tables[split], device)
        if not views:
            return
        self.augment = data.augment
        self.views_key = cache_key(data=data.content_identity(), views=self.views, seed=self.seed, format=1)
        self.view_params = self.load_or_build(f"views-{self.views_key}", lambda: self.draw_views(data), trainer)
        viewed = ViewedData(data, self.views_key)
        names = [f"{TRAIN}@view{view}" for view in range(self.views)]
        for view, name in enumerate(names):
            self.labelling = view
            try:
                self.prepare_split(teacher, digest, viewed, name, device, trainer)
            finally:
                self.labelling = None
        self.view_tables = [self.tables.pop(name) for name in names]
        self.hits[TRAIN] = all([self.hits.pop(name) for name in names])
        self.labelled_rows[TRAIN] = sum(self.labelled_rows.pop(name) for name in names)
        for table in self.view_tables if self.location == "memory" else []:
            self.device_tables.on(table, device)  # lookups on the device, copied there now rather than in a step
        self.device_tables.on(self.view_params, device)
        self.start_epoch(self.view)
        data.replay_views(self)

    def teacher_input(self, batch: Any, device: torch.device) -> Tensor:
        """While labelling view ``v``: the batch's samples (index: the batch's last tensor) in view ``v``."""
        x = super().teacher_input(batch, device)
        if self.labelling is None:
            return x
        return self.augment.apply_per_sample(x, self.draw(batch[-1], self.labelling, device))

    def load_or_build(
        self, key: str, build: Callable[[], dict[str, np.ndarray]], trainer: Trainer | None
    ) -> dict[str, np.ndarray]:
        """The table under ``key``: read from disk, else built (by global rank 0 first when there are several
        processes, the others then read its entry, or build their own on a disk of their own; in memory,
        every process builds its own: drawing is cheap and deterministic)."""
        entry = self.directory / key if self.location == "disk" and self.directory else None
        several = entry is not None and trainer is not None and trainer.world_size > 1
        if several and trainer.global_rank != 0:
            trainer.strategy.barrier("teacher_views")
        table = self.read(entry)
        if table is None:
            table = build()
            if entry is not None:
                self.write(entry, table, {"views": key})
                table = self.read(entry, verify=False) or table
        if several and trainer.global_rank == 0:
            trainer.strategy.barrier("teacher_views")
        return table

    def draw_views(self, data: ReplaysViews) -> dict[str, np.ndarray]:
        """Every view's per-sample parameters, ``(views, samples, ...)`` arrays, drawn on the CPU in index
        order (device-independent) from a generator seeded with ``(seed, view)``."""
        per_view = []
        for view in range(self.views):
            generator = torch.Generator().manual_seed(view_seed(self.seed, view))
            chunks: dict[str, list[np.ndarray]] = {}
            for batch in data.ordered_dataloader(TRAIN):
                x = batch[0] if isinstance(batch, (list, tuple)) else batch
                for name, value in data.augment.draw(x, generator=generator).per_sample().items():
                    chunks.setdefault(name, []).append(value.numpy())
            per_view.append({name: np.concatenate(arrays) for name, arrays in chunks.items()})
        return {name: np.stack([view[name] for view in per_view]) for name in per_view[0]}

    # ----------------------------------------------------------------------------------- replay
    def start_epoch(self, epoch: int) -> None:
        """Serve view ``epoch % views`` from now on: its parameters (:meth:`draw`) and its outputs (lookups)."""
        self.view = epoch % self.views
        if self.view_tables:
            self.tables[TRAIN] = self.view_tables[self.view]

    def draw(self, index: Tensor, view: int | None = None, device: torch.device | None = None) -> dict[str, Tensor]:
        """The stored augmentation parameters of training samples ``index`` in ``view`` (default: the
        current one), per parameter name, on ``device`` (default: ``index``'s); looked up on the device (the
        parameters are copied there once): no host read per batch."""
        if not self.view_params:
            raise RuntimeError("teacher_cache=per_view has no views yet; call prepare() first")
        view = self.view if view is None else view
        device = device or index.device
        rows = index.to(device).long()
        return {name: values[view][rows] for name, values in self.device_tables.on(self.view_params, device).items()}


def view_seed(seed: int, view: int) -> int:
    """The generator seed of ``view``'s parameters: distinct per (seed, view), stable across runs."""
    return int(np.random.SeedSequence([seed, view]).generate_state(1, dtype=np.uint64)[0] >> 1)


class ViewedData:
    """``data`` as the base cache sees it while labelling views: one split per view (``train@view<v>``), all
    served by ``data``'s ordered training loader, with the views' key in the content identity (so each view's
    table is keyed by the teacher, the data and exactly these views)."""

    def __init__(self, data: CacheableData, views_key: str) -> None:
        self.data = data
        self.views_key = views_key

    def content_identity(self) -> dict[str, Any]:
        return {**self.data.content_identity(), "views": self.views_key}

    def ordered_dataloader(self, split: str) -> Any:
        return self.data.ordered_dataloader(TRAIN)
