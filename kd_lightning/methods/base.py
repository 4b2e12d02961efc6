"""What every training method shares: frozen models by name, the optimizer from the trainable
parameters, eval-mode handling, learning-rate scaling and checkpoints without the frozen models."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.types import OptimizerLRScheduler
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch import Tensor, nn

from kd_lightning.engine.checkpointing import FrozenOutOfCheckpoints
from kd_lightning.engine.nonfinite import NONFINITE, NonFiniteGuard, Reduce
from kd_lightning.engine.resume import rng_states, set_rng_states
from kd_lightning.engine.weights import freeze

_EVAL_MODE_WARNING = r"Found \d+ module\(s\) in eval mode at the start of training"

OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]
__all__ = ["NONFINITE", "HasFrozenModels", "Method", "OptimizerFactory", "SchedulerFactory"]


@runtime_checkable
class HasFrozenModels(Protocol):
    """A LightningModule that holds frozen models (what the frozen-model guard checks)."""

    def frozen_models(self) -> Mapping[str, nn.Module]: ...


class Method(FrozenOutOfCheckpoints, L.LightningModule):
    """Base class of training methods (``conf/method/*.yaml``): one scheme, one LightningModule.

    - Frozen models (teachers) are registered by name with :meth:`add_frozen` (state-dict prefix
      ``<name>.``): frozen (``eval()``, ``requires_grad_(False)``), kept in eval mode whatever Lightning
      switches, never in the optimizer, left out of checkpoints unless ``save_teacher`` (put back from
      memory on load).
    - The optimizer gets every trainable parameter the module owns (models, loss adapters, heads).
    - ``scale_lr_with_world_size`` multiplies the learning rate by the number of processes (linear
      scaling rule, Goyal et al. 2017).
    - A non-finite training loss (:meth:`finite_step`) stops the run with a
      :class:`~kd_lightning.engine.errors.TrainingDiverged` naming the first non-finite step, the non-finite
      loss parts and model outputs (``nonfinite="error"``), or skips the step with a warning and counts it in
      ``train/nonfinite_steps`` (``"skip"``); every process decides alike. ``nonfinite_check_every``: how
      often the host reads the check (:mod:`kd_lightning.engine.nonfinite`: ``auto`` = every step on the
      CPU, every 100 steps on accelerators, where a per-step read would stall the device; ``skip`` reads
      every step), and always before validation, a checkpoint, an epoch's end and the end of training.
    - Checkpoints also carry the random number generators' states (put back when the resumed run's
      first epoch starts, so it draws what the uninterrupted run drew) and :meth:`resume_state`.

    Class attributes a method declares for the recipe that builds it:

    - ``uses_unlabelled_data``: the method learns from unlabelled samples (target ``-1``, e.g. a
      teacher-labelled transfer set); without it the recipe leaves such samples out of the data.
    - ``compared_with_scratch``: the summary compares the student with the same student trained alone
      (``compare_scratch``); a method that *is* that baseline says no.
    - ``teacher_range``: how many teachers (``method.teachers``) it takes, (fewest, most; None: no limit).
    - ``caches_teacher_outputs``: its teachers may read per-sample outputs from ``teacher_cache``.
    """

    uses_unlabelled_data: bool = False
    compared_with_scratch: bool = False
    teacher_range: tuple[int, int | None] = (0, 0)
    #: Its teachers may serve outputs stored per sample (``teacher_cache``), which ``teacher_cache=auto`` uses.
    caches_teacher_outputs: bool = False
    #: The settings a diverged run's error names (keys of the command that runs the method).
    divergence_advice = (
        "lower optimizer.lr, check the teacher's weights (teacher.checkpoint), or set runtime.nonfinite=skip "
        "to skip such steps"
    )
    #: The config group of the non-finite settings (``<group>.nonfinite``, ``<group>.nonfinite_check_every``).
    nonfinite_group = "runtime"

    def __init__(
        self,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        scale_lr_with_world_size: bool = False,
        save_teacher: bool = False,
        nonfinite: str = "error",
        nonfinite_check_every: int | str = "auto",
    ) -> None:
        super().__init__()
        self.nonfinite_guard = NonFiniteGuard(
            nonfinite, nonfinite_check_every, self.divergence_advice, self.nonfinite_group
        )
        self.nonfinite = nonfinite
        self.skipped_steps = 0
        self.restored_rng: dict[str, Any] | None = None
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.scale_lr_with_world_size = scale_lr_with_world_size
        self.save_teacher = save_teacher
        self.frozen_names: list[str] = []
        self.strict_loading = True

    @classmethod
    def needs_sample_index(cls, loss: nn.Module | None, cached_teachers: bool) -> bool:
        """Whether batches must carry dataset sample indices (``(x, y, index)``) for this method with
        ``loss`` and, when ``cached_teachers``, teacher outputs looked up by index."""
        return False

    @classmethod
    def check_config(cls, loss: nn.Module | None, models: Mapping[str, nn.Module], cached_teachers: bool) -> None:
        """Checks of this method's configuration that need no training (e.g. layer paths), run by the
        recipe before any teacher is trained; ``models`` by name (``student``, teachers), ``cached_teachers``:
        teacher outputs come from the teacher-output cache. Nothing by default."""

    @classmethod
    def check_options(cls, options: Mapping[str, Any], models: Mapping[str, nn.Module]) -> None:
        """Checks of the method's own options (``method.<key>``, as configured) against the untrained models
        (``student`` and the teachers by name), run by the recipe before any teacher is trained. Nothing by
        default."""

    @classmethod
    def check_trainer(cls, trainer: L.Trainer) -> None:
        """Checks of the trainer (strategy, precision) this method needs, run by the recipe before any
        training. Nothing by default."""

    @classmethod
    def metric_names(cls, loss: nn.Module | None, teachers: Sequence[str]) -> set[str]:
        """The metric keys this method logs (``optimized_metric`` and checkpoint monitors must be one)."""
        return {"train/nonfinite_steps"}

    def prepare(self, datamodule: L.LightningDataModule) -> None:
        """Called by the recipe before ``fit`` (and before parameters are counted): e.g. size adapters
        from an example batch. Nothing by default."""

    def training_data(self, datamodule: L.LightningDataModule) -> L.LightningDataModule:
        """The datamodule ``fit`` runs on, given the configured one (validation and test always use the
        configured one): that datamodule itself by default; a data-free method returns one whose training
        batches never read a training input."""
        return datamodule

    # ------------------------------------------------------------------------------------- models
    def add_frozen(self, name: str, model: nn.Module) -> nn.Module:
        """Register ``model`` frozen under ``name`` (its state-dict prefix); returns it."""
        self.add_module(name, freeze(model))
        self.frozen_names.append(name)
        self.configure_frozen_loading()
        return model

    def frozen_models(self) -> dict[str, nn.Module]:
        return {name: getattr(self, name) for name in self.frozen_names}

    def train(self, mode: bool = True) -> Method:
        """Switch the trainable models' mode; frozen models always stay in eval mode."""
        super().train(mode)
        for model in self.frozen_models().values():
            model.eval()
        return self

    def on_fit_start(self) -> None:
        # Lightning warns about every module in eval mode; frozen models are meant to be, so the
        # warning is replaced by one about the trainable modules alone (warn_modules_in_eval).
        warnings.filterwarnings("ignore", message=_EVAL_MODE_WARNING, category=PossibleUserWarning)
        self.put_back_rng()

    def warn_modules_in_eval(self, model: nn.Module, name: str) -> None:
        in_eval = [path or "<root>" for path, m in model.named_modules() if not m.training]
        if in_eval:
            rank_zero_warn(f"{name} modules in eval mode at the start of training: {in_eval[:5]}")

    # --------------------------------------------------------------------------------- divergence
    def finite_step(
        self, total: Tensor, parts: Mapping[str, Tensor], outputs: Mapping[str, Mapping[str, Tensor]]
    ) -> bool:
        """Whether to back-propagate ``total``; ``parts`` / ``outputs`` (model outputs by name) say what went
        non-finite. Checked now (every step, or ``skip``: a non-finite step on any process is counted and
        skipped, False) or recorded on the device and checked every ``nonfinite_check_every`` steps (always
        True): a non-finite step raises :class:`~kd_lightning.engine.errors.TrainingDiverged` at the check
        that finds it (:class:`~kd_lightning.engine.nonfinite.NonFiniteGuard`)."""
        keep = self.nonfinite_guard.step(total, parts, outputs, self.current_epoch, self.global_step, self.collective())
        if not keep:
            self.skipped_steps += 1
        return keep

    def collective(self) -> Reduce | None:
        """Reduction across the trainer's processes (None with one process, or no trainer)."""
        if self._trainer is None or self.trainer.world_size == 1:
            return None
        strategy = self.trainer.strategy
        return lambda tensor, op: strategy.reduce(tensor, reduce_op=op)

    def check_nonfinite(self) -> None:
        """Raise now if a recorded step went non-finite (a no-op without recorded steps)."""
        self.nonfinite_guard.check(self.collective())

    def on_train_epoch_end(self) -> None:
        self.check_nonfinite()
        if self.nonfinite == "skip":
            self.log("train/nonfinite_steps", float(self.skipped_steps), reduce_fx="max", sync_dist=True)

    def on_validation_start(self) -> None:
        self.check_nonfinite()  # never validate (and then checkpoint) weights a non-finite step produced

    def on_train_end(self) -> None:
        self.check_nonfinite()

    # ----------------------------------------------------------------------------------- resuming
    def resume_state(self) -> dict[str, Any]:
        """State spanning epochs that a resumed run needs besides weights, optimizer and loops (tensors and
        plain values); see :meth:`restore`."""
        return {"skipped_steps": self.skipped_steps}

    def restore(self, state: Mapping[str, Any]) -> None:
        self.skipped_steps = int(state.get("skipped_steps", 0))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.check_nonfinite()  # a checkpoint never holds weights a non-finite step produced
        super().on_save_checkpoint(checkpoint)
        checkpoint["kd_lightning"] = {"rng": rng_states(), **self.resume_state()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("kd_lightning") or {}
        self.restore(state)
        self.restored_rng = state.get("rng")

    def put_back_rng(self) -> None:
        """The generators as they were when the resumed checkpoint was saved. The uninterrupted run went on
        from that state to its next training epoch; a resumed run's first training iterator is created
        right after the sanity-check validation (which draws too), so the states are put back when fitting
        starts and again after the sanity check, and no longer once training starts."""
        if self.restored_rng is not None:
            set_rng_states(self.restored_rng)

    def on_validation_end(self) -> None:
        if self.trainer.sanity_checking:
            self.put_back_rng()

    def on_train_start(self) -> None:
        self.restored_rng = None

    # --------------------------------------------------------------------------------- optimizers
    def trainable_parameters(self) -> list[nn.Parameter]:
        """Every parameter that requires grad, in registration order; never a frozen model's."""
        frozen = {id(p) for model in self.frozen_models().values() for p in model.parameters()}
        return [p for p in self.parameters() if p.requires_grad and id(p) not in frozen]

    def build_optimizer(self, params: Sequence[nn.Parameter], lr: float | None = None) -> torch.optim.Optimizer:
        """The configured optimizer over ``params`` (at learning rate ``lr`` if given), scaled by the number
        of processes when ``scale_lr_with_world_size``."""
        optimizer = self.optimizer_factory(params=list(params))
        for group in optimizer.param_groups:
            if lr is not None:
                group["lr"] = float(lr)
            if self.scale_lr_with_world_size:
                group["lr"] *= self.trainer.world_size
        return optimizer

    def configure_optimizers(self) -> OptimizerLRScheduler:
        optimizer = self.build_optimizer(self.trainable_parameters())
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer)}}
