"""The teacher object: a frozen model a method distils from, and everything about running it.

In the spirit of timm's ``DistillationTeacher``: the teacher owns its eval mode and frozen weights,
its precision (autocast of the teacher alone), its layer taps, its output cache (teacher logits looked
up by sample index instead of computed) and the reuse of its validation outputs across epochs. Methods
hold teachers by name (``teacher``, ``teacher_1``, ...) and register each one's ``model`` under that name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from kd_lightning.data.contract import CacheableData
from kd_lightning.engine.batches import Inputs, batch_size, input_device
from kd_lightning.engine.caching.store import weights_digest
from kd_lightning.engine.errors import ConfigError
from kd_lightning.engine.resume import side_rng
from kd_lightning.engine.runtime import TEACHER_DTYPES
from kd_lightning.engine.taps import Taps
from kd_lightning.engine.weights import freeze
from kd_lightning.teacher.outputs import TeacherOutputCache
from kd_lightning.teacher_inputs import adapted

if TYPE_CHECKING:
    from lightning.pytorch import Trainer


@dataclass
class Provenance:
    """Where a teacher's weights came from and what getting them cost."""

    source: str = "given"
    fit_seconds: float = 0.0


class Teacher:
    """A frozen ``model`` and how it runs.

    Args:
        model: any ``nn.Module``; frozen (``eval()``, ``requires_grad_(False)``) here.
        name: the teacher's name: its state-dict prefix in the method and the ``model`` that loss terms
            read (``teacher: {model: <name>}``).
        precision: ``bf16`` / ``fp16`` runs it under autocast (outputs cast back to float32); None: as is.
        cache: a :class:`~kd_lightning.teacher.outputs.TeacherOutputCache` of its logits
            per split, looked up by sample index (``conf/teacher_cache``); None: always run the model.
        reuse_val_outputs: keep the validation logits of the first epoch and reuse them, for data
            that declares ``random_augmentation = False``.
        provenance: where the weights came from (for the summary).
        input: a module converting the student's batch ``x`` to the teacher's input (``teacher.input``, see
            :mod:`kd_lightning.teacher_inputs`: re-normalise / resize images, the teacher's tokenisation of
            text); None: the teacher reads ``x`` as it is.
    """

    def __init__(
        self,
        model: nn.Module,
        name: str = "teacher",
        precision: str | None = None,
        cache: TeacherOutputCache | None = None,
        reuse_val_outputs: bool = True,
        provenance: Provenance | None = None,
        input: nn.Module | None = None,
    ) -> None:
        if precision is not None and precision not in TEACHER_DTYPES:
            raise ConfigError(f"runtime.teacher_precision={precision!r}: use one of {sorted(TEACHER_DTYPES)} or null")
        self._model = freeze(model)
        self._owner: nn.Module | None = None
        self._digest: str | None = None
        self.name = name
        self.precision = precision
        self.cache = cache
        self.reuse_val_outputs = reuse_val_outputs
        self.provenance = provenance or Provenance()
        self.input = freeze(input) if input is not None else None
        self._input_device: torch.device | None = None
        self.taps = Taps(self._model, {})
        self.stored_val_logits: dict[tuple[int, int], Tensor] = {}

    @property
    def model(self) -> nn.Module:
        """The frozen model; once :meth:`bind` to a method, the module registered there under ``name``
        (what a strategy that wraps submodules, e.g. FSDP, runs)."""
        return getattr(self._owner, self.name) if self._owner is not None else self._model

    @property
    def digest(self) -> str:
        """sha256 of the frozen weights (computed once: they never change), recorded in checkpoints."""
        if self._digest is None:
            self._digest = weights_digest(self._model)
        return self._digest

    def bind(self, owner: nn.Module) -> None:
        """Run the model as ``owner`` holds it (``owner.<name>``, registered by the method)."""
        self._owner = owner

    def tap(self, paths: Mapping[str, str]) -> None:
        """Capture these outputs (output key -> config key, see :class:`~kd_lightning.engine.taps.Taps`)."""
        self.taps.remove()
        self.taps = Taps(self._model, paths)

    # ---------------------------------------------------------------------------------- forwards
    def teacher_input(self, x: Inputs) -> Inputs:
        """The student's batch ``x`` as the teacher reads it: through ``input`` (moved to ``x``'s device the
        first time), then floating images in the teacher's weight dtype (strategies that cast batches to a low
        precision, e.g. FSDP mixed precision, leave the teacher's weights as they are)."""
        if self.input is not None:
            device = input_device(x)
            if self._input_device != device:
                self.input.to(device)
                self._input_device = device
            x = self.input(x)
        weight = next(self.model.parameters(), None)
        if weight is not None and isinstance(x, Tensor) and x.is_floating_point() and x.dtype != weight.dtype:
            x = x.to(weight.dtype)
        return x

    def outputs(self, x: Inputs) -> dict[str, Tensor]:
        """``{"logits": ..., "<tapped key>": ...}`` without autograd and, with ``precision``, under autocast;
        floating outputs in float32. (``no_grad``, not ``inference_mode``: inference tensors could not be saved
        for the student's backward and would need a copy every step.)"""
        with torch.no_grad():
            outputs = self.forward_captured(self.teacher_input(x))
        return {name: out.float() if out.is_floating_point() else out for name, out in outputs.items()}

    def outputs_with_input_grad(self, x: Tensor) -> dict[str, Tensor]:
        """Like :meth:`outputs`, but differentiable with respect to ``x``: the forward runs with autograd on,
        so a loss on these outputs back-propagates to whatever made ``x`` (e.g. a generator,
        ``method=data_free``). The weights stay frozen and in eval mode (BatchNorm uses its running
        statistics): they require no grad, so they get none."""
        with torch.enable_grad():
            outputs = self.forward_captured(self.teacher_input(x))
        return {name: out.float() if out.is_floating_point() else out for name, out in outputs.items()}

    def forward_captured(self, x: Inputs) -> dict[str, Tensor]:
        """One forward of the teacher input ``x``: its logits and tapped layers, under autocast at ``precision``
        (the plain call when neither taps nor a precision are set: no context to enter every step)."""
        dtype = TEACHER_DTYPES.get(self.precision) if self.precision else None
        if dtype is None:
            logits, layers = self.taps.run(self.model, x)
        else:
            with torch.autocast(input_device(x).type, dtype=dtype):
                logits, layers = self.taps.run(self.model, x)
        return {"logits": logits, **layers}

    def logits(self, x: Inputs, split: str, index: Tensor | None) -> Tensor:
        """The logits for ``x``: from the output cache (by sample ``index``) or a forward."""
        if self.cache is None:
            return self.outputs(x)["logits"]
        if index is None:
            raise ConfigError(
                "teacher_cache looks teacher outputs up by sample index but batches are (x, y): "
                "set data.return_index=true (kd-distill does this itself)"
            )
        return self.cache.logits(split, index)

    def val_logits(self, x: Inputs, index: Tensor | None, key: tuple[int, int], store: bool) -> Tensor:
        """Validation logits: from the cache, else computed on the first epoch and reused after (when
        ``reuse_val_outputs`` and ``store``: deterministic data, not a sanity check), else computed."""
        if self.cache is not None:
            return self.logits(x, "val", index)
        stored = self.stored_val_logits.get(key)
        if stored is not None and stored.shape[0] == batch_size(x):
            return stored
        logits = self.outputs(x)["logits"]
        if self.reuse_val_outputs and store:
            self.stored_val_logits[key] = logits
        return logits

    # ------------------------------------------------------------------------------------ caching
    def check_cache(self, datamodule: object) -> None:
        """The output cache holds outputs per sample (or per stored view of a sample): refuse data it cannot
        serve (:meth:`TeacherOutputCache.check_data`). (That it serves logits only is checked where the loss
        is known: ``DistillationModule.check_config``.)"""
        if self.cache is not None:
            self.cache.check_data(datamodule)

    def start_epoch(self, epoch: int) -> None:
        """A training epoch starts: a cache of augmented views moves to that epoch's view."""
        if self.cache is not None:
            self.cache.start_epoch(epoch)

    def prepare_cache(
        self, datamodule: CacheableData, splits: tuple[str, ...], device: torch.device, trainer: Trainer
    ) -> None:
        """Fill the cache's tables for ``splits`` (:meth:`TeacherOutputCache.prepare`), called in every
        process: on a miss each labels its own shard of a split and the shards are gathered with
        ``trainer``'s strategy. Filling draws nothing from the run's random number generators (a hit and a
        miss train alike)."""
        if self.cache is None:
            return
        if self.input is not None:
            self.input.to(device)
        with side_rng():
            self.cache.prepare(adapted(self.model, self.input), datamodule, splits, device, trainer)
