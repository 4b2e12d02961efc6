"""``method=mutual``: online deep mutual learning between trainable peers, no pre-trained teacher."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.types import OptimizerLRScheduler
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from kd_lightning.engine.batches import batch_size
from kd_lightning.engine.errors import ConfigError, check_type
from kd_lightning.engine.runtime import Runtime
from kd_lightning.losses import DistillationLoss
from kd_lightning.losses.base import TASK_MODEL
from kd_lightning.losses.mixture import mixture_logits
from kd_lightning.methods.base import OptimizerFactory, SchedulerFactory
from kd_lightning.methods.classifier import Batch, ClassifierMethod, unpack


def soft_mixture(logits: Sequence[Tensor], temperature: float) -> Tensor:
    """Logits ``T log mean_j softmax(z_j / T)`` of the mean softened distribution (float32): the equal-weight
    :func:`~kd_lightning.losses.mixture.mixture_logits`."""
    stacked = torch.stack([z.float() for z in logits])
    log_weights = torch.full(stacked.shape[:-1], -math.log(len(logits)), device=stacked.device)
    return mixture_logits(stacked, log_weights, temperature)


class MutualLearning(ClassifierMethod):
    r"""Deep mutual learning (Zhang et al., "Deep Mutual Learning", CVPR 2018).

    The ``student`` and the ``peers`` (N >= 2 models in all, any architectures) train together from
    scratch; each is the others' teacher. Peer :math:`i` minimises the configured loss with the others'
    *detached* softened outputs as its target:

    .. math::
        L_i = (1 - \alpha)\,\mathrm{CE}(z_i, y) + \alpha \sum_t w_t L_t\big(z_i,\ \bar z_{-i}\big), \qquad
        \bar z_{-i} = T \log \frac{1}{N - 1}\sum_{j \ne i} \sigma(z_j / T)

    (for N = 2 the paper's :math:`\mathrm{KL}(p_j \,\|\, p_i)`; for N > 2 the KL to the others' mean, the
    paper's DML_e variant). One forward per peer per step; no gradient crosses peers. One optimizer over
    all peers (the summed loss), or with ``optimizer_per_peer`` one optimizer (and scheduler) per peer, as
    in the paper: since no gradient crosses peers, the two are the same for element-wise optimizers (SGD,
    Adam, AdamW; tested) and differ where an optimizer or scheduler looks at all its parameters at once.
    The loss terms must read logits (``student`` / ``teacher``).

    Logged: ``val/acc`` (the student, the model deployed), ``val/acc/<peer>``, ``val/acc_ensemble`` (the
    mean of every peer's probabilities), ``val/agreement`` (student vs the other peers' mixture),
    ``train/loss_<part>`` summed over peers; at test ``test/acc/<peer>`` and ``test/acc_ensemble``. Every peer
    is in the checkpoint (``peers.<name>.*``).
    """

    uses_unlabelled_data = True
    compared_with_scratch = True

    def __init__(
        self,
        student: nn.Module,
        loss: DistillationLoss,
        optimizer: OptimizerFactory,
        num_classes: int,
        peers: Mapping[str, nn.Module],
        scheduler: SchedulerFactory | None = None,
        scale_lr_with_world_size: bool = False,
        runtime: Runtime | None = None,
        optimizer_per_peer: bool = False,
    ) -> None:
        super().__init__(student, num_classes, optimizer, scheduler, scale_lr_with_world_size, runtime=runtime)
        type(self).check_options({"optimizer_per_peer": optimizer_per_peer}, {})
        self.optimizer_per_peer = optimizer_per_peer
        self.automatic_optimization = not self.optimizer_per_peer
        if not peers:
            raise ConfigError("method=mutual needs at least one peer besides the student (method.peers)")
        if TASK_MODEL in peers:
            raise ConfigError(f"method.peers: {TASK_MODEL!r} is the student itself; name the peers otherwise")
        self.check_config(loss, {}, False)
        self.loss = loss
        self.peers = nn.ModuleDict(dict(peers))
        self.apply_runtime([("student", model) for model in (student, *self.peers.values())])
        self.peer_acc = nn.ModuleDict({name: MulticlassAccuracy(num_classes, average="micro") for name in peers})
        self.ensemble_acc = MulticlassAccuracy(num_classes, average="micro")
        self.peer_test_acc = nn.ModuleDict({name: MulticlassAccuracy(num_classes, average="micro") for name in peers})
        self.ensemble_test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_agreement = MulticlassAccuracy(num_classes, average="micro")

    @classmethod
    def check_options(cls, options: Mapping[str, Any], models: Mapping[str, nn.Module]) -> None:
        """``method.optimizer_per_peer`` is a bool (a string such as ``maybe`` would read as true)."""
        super().check_options(options, models)
        check_type(options.get("optimizer_per_peer", False), bool, "method.optimizer_per_peer")

    @classmethod
    def check_config(cls, loss: nn.Module | None, models: Mapping[str, nn.Module], cached_teachers: bool) -> None:
        """Peers exchange logits only: every term must read the ``student`` and ``teacher`` logits."""
        if not isinstance(loss, DistillationLoss):
            raise ConfigError("method=mutual needs a DistillationLoss (loss=kd, dkd, dist)")
        layered = sorted(key for model in loss.models_read for key in loss.layers(model).values())
        if layered or not loss.models_read <= {TASK_MODEL, "teacher"}:
            raise ConfigError(
                f"method=mutual exchanges logits between peers, but {layered or sorted(loss.models_read)} read "
                "other tensors; use a logit loss (loss=kd, dkd or dist)"
            )

    @classmethod
    def metric_names(cls, loss: nn.Module | None, teachers: Sequence[str]) -> set[str]:
        parts = {f"train/loss_{name}" for name in loss.terms} if isinstance(loss, DistillationLoss) else set()
        own = {"train/loss_ce", "val/acc_ensemble", "val/agreement", "val/acc/*", "test/acc/*", "test/acc_ensemble"}
        return super().metric_names(loss, teachers) | parts | own

    def models(self) -> dict[str, nn.Module]:
        return {TASK_MODEL: self.student, **dict(self.peers.items())}

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor | None:
        x, y, _ = unpack(batch)
        x = self.formatted(x)
        logits = {name: model(x) for name, model in self.models().items()}
        temperature = self.loss.temperature
        label_count = self.mean_label_count(y) if self.loss.weighs_task_term else None
        total, parts = torch.zeros((), device=x.device), {}
        for name, own in logits.items():
            others = [z.detach() for other, z in logits.items() if other != name]
            outputs = {TASK_MODEL: {"logits": own}, "teacher": {"logits": soft_mixture(others, temperature)}}
            out = self.loss(outputs, y, label_count=label_count)
            total = total + out.total
            parts = {part: parts.get(part, 0.0) + value for part, value in out.parts.items()}
        if not self.finite_step(total, parts, {name: {"logits": z} for name, z in logits.items()}):
            return None
        self.record_losses(total, parts, batch_size(x))
        if not self.optimizer_per_peer:
            return total
        optimizers = self.optimizers()
        for optimizer in optimizers:
            optimizer.zero_grad()
        self.manual_backward(total)  # each peer's parameters get the gradient of its own loss alone
        for optimizer in optimizers:
            optimizer.step()
        return None

    # --------------------------------------------------------------------------------- optimizers
    def configure_optimizers(self) -> OptimizerLRScheduler:
        """One optimizer over every peer, or (``optimizer_per_peer``) one per peer, the student's also
        holding the loss's parameters, each with its own scheduler."""
        if not self.optimizer_per_peer:
            return super().configure_optimizers()
        peers = {id(p) for model in self.peers.values() for p in model.parameters()}
        own = [p for p in self.trainable_parameters() if id(p) not in peers]
        optimizers = [self.build_optimizer(own)] + [self.build_optimizer(m.parameters()) for m in self.peers.values()]
        if self.scheduler_factory is None:
            return optimizers
        return optimizers, [{"scheduler": self.scheduler_factory(optimizer)} for optimizer in optimizers]

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        if self.optimizer_per_peer and self.scheduler_factory is not None:
            for scheduler in self.lr_schedulers():
                scheduler.step()

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        x, y, _ = unpack(batch)
        x = self.formatted(x)
        logits = {name: model(x) for name, model in self.models().items()}
        self.log_student_val(logits[TASK_MODEL], y)
        for name in self.peers:
            self.peer_acc[name](logits[name], y)
            self.log(f"val/acc/{name}", self.peer_acc[name])
        ensemble = torch.stack([F.softmax(z.float(), -1) for z in logits.values()]).mean(0)
        self.ensemble_acc(ensemble, y)
        self.log("val/acc_ensemble", self.ensemble_acc)
        others = soft_mixture([z for name, z in logits.items() if name != TASK_MODEL], 1.0)
        self.val_agreement(logits[TASK_MODEL], others.argmax(-1))
        self.log("val/agreement", self.val_agreement)

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        x, y, _ = unpack(batch)
        x = self.formatted(x)
        logits = {name: model(x) for name, model in self.models().items()}
        self.log_student_test(logits[TASK_MODEL], y)
        for name in self.peers:
            self.peer_test_acc[name](logits[name], y)
            self.log(f"test/acc/{name}", self.peer_test_acc[name])
        self.ensemble_test_acc(torch.stack([F.softmax(z.float(), -1) for z in logits.values()]).mean(0), y)
        self.log("test/acc_ensemble", self.ensemble_test_acc)
