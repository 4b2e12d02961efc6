"""``method=data_free``: distillation from a frozen teacher with generated inputs, no training data."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.types import OptimizerLRScheduler
from torch import Tensor, nn

from kd_lightning.data.contract import HasExampleInput
from kd_lightning.data.synthetic_steps import SyntheticSteps
from kd_lightning.engine.errors import ConfigError
from kd_lightning.losses import UNLABELLED
from kd_lightning.losses.base import TASK_MODEL
from kd_lightning.methods.classifier import EpochMeans
from kd_lightning.methods.data_free_prior import GENERATOR_PARTS, BatchNormPrior
from kd_lightning.methods.data_free_rules import check_batch_norm, check_loss, check_settings, check_strategy
from kd_lightning.methods.kd import DistillationModule
from kd_lightning.models.generator import Generator1D
from kd_lightning.teacher import Teacher


class DataFreeDistillation(DistillationModule):
    r"""Data-free distillation: a generator makes the inputs; the student never sees a training sample.

    A generator :math:`G` (``generator``; default :class:`~kd_lightning.models.Generator1D`, sized from the
    data's ``example_input()``) and the student play the adversarial game of DAFL (Chen et al., "Data-Free
    Learning of Student Networks", ICCV 2019) and DFAD / Fast-Datafree (Fang et al. 2019; "Up to 100x Faster
    Data-free Knowledge Distillation", AAAI 2022), with DeepInversion's BatchNorm-statistics prior (Yin et al.,
    "Dreaming to Distill", CVPR 2020). Each training step draws ``batch_size`` noise vectors
    :math:`z \sim \mathcal N(0, I)` and classes :math:`y \sim \mathcal U\{0..C-1\}`, :math:`x = G(z, y)`, and

    1. **generator step** (the teacher :math:`T` frozen, eval mode, gradients through it to :math:`x` only;
       the student's weights untouched):

       .. math::
           L_G = w_{bn} \sum_l \big(\|\mu_l(x) - \hat\mu_l\|_2 + \|\sigma^2_l(x) - \hat\sigma^2_l\|_2\big)
               + w_{ce}\,\mathrm{CE}(T(x), y) - w_{adv}\,\frac1B \sum_i m_i\,\mathrm{KL}\big(\sigma(T(x_i)) \,\|\,
               \sigma(S(x_i))\big) + w_{ie}\,\big(\log C - H(\tfrac1B \textstyle\sum_i \sigma(T(x_i)))\big)

       over the teacher's BatchNorm layers :math:`l` (batch statistics of their inputs against the running
       ones; ``bn_weight``); the teacher's cross-entropy on the sampled class (``ce_weight``; ``targets=argmax``:
       DAFL's one-hot loss on the teacher's own argmax, with an unconditional generator); adaptive competition
       (``adv_weight``: samples where student and teacher disagree, at T = 1, masked as in Fast-Datafree to
       samples on which their top-1 classes still agree, :math:`m_i`); DAFL's information-entropy term that
       balances classes over the batch (``ie_weight``, 0 when the batch's mean prediction is uniform).
    2. ``student_steps`` **student steps** on fresh :math:`x = \mathrm{aug}(G(z, y))` (no gradient to
       :math:`G`; ``augment``: a random augmentation both models see, as DeepInversion and Fast-Datafree
       augment their synthetic images for the student): the configured ``loss`` (any logit or feature loss of
       ``conf/loss``) on teacher and student outputs, every target unlabelled
       (:data:`~kd_lightning.losses.UNLABELLED`): only the distillation terms act, the task term is 0
       (``loss.alpha`` only scales them).

    Two optimizers, Lightning manual optimisation: the generator's (the configured ``optimizer`` with
    ``generator_lr``) and the student's (the configured ``optimizer`` over the student and the loss's
    parameters, with ``scheduler``, stepped per epoch). ``trainer.global_step`` counts both
    (``1 + student_steps`` per training batch). Fitting runs on :class:`~kd_lightning.data.synthetic_steps.
    SyntheticSteps` (``steps_per_epoch`` batches; :meth:`training_data`): the configured datamodule serves
    validation and test only. The generator is checkpointed (``generator.*``); the teacher is not.

    Published settings and the defaults here: Fast-Datafree's CIFAR scripts use ``bn 10, oh 0.4, adv 1.1``
    (KamalEngine's ``faster_data_free_kd.py``), its DFQ baseline ``bn 1, oh 1, adv 1`` with 10 student steps
    per generator step and a generator lr of 1e-3; DAFL ``oh 1, ie 5`` plus an activation term (left out
    here). The defaults (``bn_weight 10, ce_weight 1, adv_weight 5, student_steps 5, generator_lr 1e-3``, MNIST-1D
    augmentation in ``conf/method/data_free.yaml``) were tuned briefly on MNIST-1D. Deviations: a
    class-conditional generator trained throughout (no per-batch re-initialisation or meta-learning as in
    Fast-Datafree, no memory bank of past samples as in Fast-Datafree / CMI); the competition term is the
    masked KL, not DFAD's L1 on logits.

    Logged besides :class:`DistillationModule`'s metrics: ``train/loss_generator`` and its unweighted parts
    ``train/loss_generator_{bn,ce,adv,ie}``, ``train/generator_teacher_acc`` (how often the teacher assigns a
    generated sample to the class it was generated for, or, with ``targets=argmax``, its mean top-1 probability).
    """

    caches_teacher_outputs = False  # new inputs every step: nothing per sample to store

    teacher_range = (1, 1)

    def __init__(
        self,
        *args: Any,
        generator: nn.Module | Callable[..., nn.Module] | None = None,
        generator_lr: float | None = 1e-3,
        batch_size: int = 256,
        steps_per_epoch: int = 50,
        student_steps: int = 5,
        bn_weight: float = 10.0,
        ce_weight: float = 1.0,
        adv_weight: float = 5.0,
        ie_weight: float = 0.0,
        targets: str = "sampled",
        augment: Callable[[Tensor], Tensor] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.automatic_optimization = False
        weights = {"bn_weight": bn_weight, "ce_weight": ce_weight, "adv_weight": adv_weight, "ie_weight": ie_weight}
        steps = {"batch_size": batch_size, "steps_per_epoch": steps_per_epoch, "student_steps": student_steps}
        check_settings({**steps, **weights, "generator_lr": generator_lr, "targets": targets, "augment": augment})
        self.augment = augment
        self.batch_size = batch_size
        self.steps_per_epoch = steps_per_epoch
        self.student_steps = student_steps
        self.bn_weight, self.ce_weight, self.adv_weight, self.ie_weight = (float(w) for w in weights.values())
        self.generator_lr = generator_lr
        self.targets = targets
        self.num_classes = self.test_acc.num_classes
        if len(self.teachers) != 1:
            raise ConfigError(f"method=data_free distils exactly one teacher, got {sorted(self.teachers)}")
        (self.teacher_name,) = self.teachers
        teacher = self.teachers[self.teacher_name].model
        check_batch_norm(teacher, self.bn_weight)
        self.bn_prior = BatchNormPrior(teacher)
        given = isinstance(generator, nn.Module)
        self.generator_factory = None if given else generator  # not a submodule: the built one is
        self.generator: nn.Module | None = generator if given else None
        self.generator_losses = EpochMeans()

    # ------------------------------------------------------------------------------------ config
    @classmethod
    def check_config(cls, loss: nn.Module | None, models: Mapping[str, nn.Module], cached_teachers: bool) -> None:
        """No teacher-output cache, a loss that distils (there are no labels) and keeps no per-sample
        memory (:func:`~kd_lightning.methods.data_free_rules.check_loss`); then :class:`DistillationModule`'s
        checks (models and layers read). That a teacher without BatchNorm is refused while ``bn_weight > 0`` is
        :meth:`check_options`'s."""
        check_loss(loss, cached_teachers)
        super().check_config(loss, models, cached_teachers)

    @classmethod
    def check_options(cls, options: Mapping[str, Any], models: Mapping[str, nn.Module]) -> None:
        """The options' values (:func:`check_settings`), and a teacher without BatchNorm refused while the
        BatchNorm prior is on, before any teacher is trained."""
        check_settings(options)
        default = inspect.signature(cls.__init__).parameters["bn_weight"].default
        bn_weight = options.get("bn_weight", default)
        for name, model in models.items():
            if name != TASK_MODEL:
                check_batch_norm(model, float(bn_weight))

    @classmethod
    def check_trainer(cls, trainer: L.Trainer) -> None:
        """Generator and student steps each leave the other's parameters without a gradient: under DDP the
        strategy must look for unused parameters (:func:`~kd_lightning.methods.data_free_rules.check_strategy`)."""
        check_strategy(trainer)

    @classmethod
    def needs_sample_index(cls, loss: nn.Module | None, cached_teachers: bool) -> bool:
        return False

    @classmethod
    def metric_names(cls, loss: nn.Module | None, teachers: Sequence[str]) -> set[str]:
        generator = {"train/loss_generator", "train/generator_teacher_acc"}
        generator |= {f"train/loss_generator_{part}" for part in GENERATOR_PARTS}
        return (super().metric_names(loss, teachers) - {"train/loss_ce"}) | generator

    # ------------------------------------------------------------------------------------ data
    def training_data(self, datamodule: L.LightningDataModule) -> L.LightningDataModule:
        """``steps_per_epoch`` placeholder batches; validation and test from ``datamodule``."""
        return SyntheticSteps(datamodule, self.steps_per_epoch)

    def prepare(self, datamodule: L.LightningDataModule) -> None:
        """Build the generator for the data's input shape (before parameters are counted), then the parent's
        adapter sizing."""
        super().prepare(datamodule)
        if isinstance(datamodule, HasExampleInput):
            self.build_generator(datamodule.example_input())

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.generator is None:
            datamodule = self.trainer.datamodule
            if not isinstance(datamodule, HasExampleInput):
                raise ConfigError(
                    "method=data_free sizes its generator from the datamodule's example_input(): call "
                    "module.prepare(datamodule) before fit, or give method.generator a model"
                )
            self.build_generator(datamodule.example_input())

    def build_generator(self, example: Tensor) -> None:
        """The generator for inputs shaped like ``example`` (a batch), from the ``generator`` factory
        (``shape``, ``num_classes``: set when ``targets=sampled``); a given module is kept."""
        if self.generator is not None:
            return
        factory = self.generator_factory or Generator1D
        conditional = self.targets == "sampled"
        self.generator = factory(
            shape=tuple(example.shape[1:]), num_classes=self.num_classes if conditional else None
        ).to(self.device)

    # ------------------------------------------------------------------------------------ optimizers
    def configure_optimizers(self) -> OptimizerLRScheduler:
        """The generator's optimizer (``generator_lr``) and the student's (with ``scheduler``), in that order."""
        own = {id(p) for p in self.generator.parameters()}
        generator_opt = self.build_optimizer(self.generator.parameters(), lr=self.generator_lr)
        student_opt = self.build_optimizer([p for p in self.trainable_parameters() if id(p) not in own])
        if self.scheduler_factory is None:
            return [generator_opt, student_opt]
        return [generator_opt, student_opt], [{"scheduler": self.scheduler_factory(student_opt)}]

    # ------------------------------------------------------------------------------------ training
    @property
    def teacher_object(self) -> Teacher:
        return self.teachers[self.teacher_name]

    def generate(self, n: int) -> tuple[Tensor, Tensor]:
        """``x = G(z, y)`` for ``n`` noise vectors and uniformly drawn classes ``y`` (unconditional: ``G(z)``)."""
        latent = getattr(self.generator, "latent_dim", None)
        if latent is None:
            raise ConfigError("method.generator must have a latent_dim attribute (the size of its noise input)")
        z = torch.randn(n, latent, device=self.device)
        y = torch.randint(self.num_classes, (n,), device=self.device)
        x = self.generator(z, y) if self.targets == "sampled" else self.generator(z)
        return self.formatted(x), y

    def generator_loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor], dict[str, dict[str, Tensor]]]:
        """:math:`L_G` of the class docstring for generated ``x`` (sampled classes ``y``), its unweighted
        parts and the model outputs; the student's weights must be toggled off by the caller."""
        with self.bn_prior.capture() as statistics:
            teacher = self.teacher_object.outputs_with_input_grad(x)["logits"]
        student = self.student(x).float()
        zero = teacher.new_zeros(())
        parts = {"bn": torch.stack(statistics).sum() if statistics else zero}
        target = y if self.targets == "sampled" else teacher.argmax(-1)
        parts["ce"] = F.cross_entropy(teacher, target)
        log_t, log_s = F.log_softmax(teacher, -1), F.log_softmax(student, -1)
        kl = (log_t.exp() * (log_t - log_s)).sum(-1)
        agree = (teacher.argmax(-1) == student.argmax(-1)).float()
        parts["adv"] = -(kl * agree).mean()
        mean_p = log_t.exp().mean(0)
        parts["ie"] = math.log(self.num_classes) + (mean_p * torch.log(mean_p.clamp_min(1e-12))).sum()
        weights = {"bn": self.bn_weight, "ce": self.ce_weight, "adv": self.adv_weight, "ie": self.ie_weight}
        total = sum((weights[name] * value for name, value in parts.items() if weights[name] > 0), zero)
        hit = teacher.argmax(-1) == y if self.targets == "sampled" else None
        parts["teacher_acc"] = hit.float().mean() if hit is not None else log_t.exp().max(-1).values.mean()
        return total, parts, {self.teacher_name: {"logits": teacher}, TASK_MODEL: {"logits": student}}

    def generator_step(self, optimizer: Any) -> None:
        with self.toggled_optimizer(optimizer):
            x, y = self.generate(self.batch_size)
            total, parts, outputs = self.generator_loss(x, y)
            acc = parts.pop("teacher_acc")
            if not self.finite_step(total, parts, outputs):
                return
            optimizer.zero_grad()
            self.manual_backward(total)
            optimizer.step()
        means = {"loss_generator": total, **{f"loss_generator_{n}": v for n, v in parts.items()}}
        self.generator_losses.add({**means, "generator_teacher_acc": acc}, x.shape[0])

    def student_step(self, optimizer: Any) -> None:
        with torch.no_grad():
            x, _ = self.generate(self.batch_size)
            if self.augment is not None:
                x = self.augment(x)
        targets = torch.full((x.shape[0],), UNLABELLED, dtype=torch.long, device=x.device)
        outputs = self.distilled_outputs(x, "train", None)
        outputs[TASK_MODEL] = self.student_outputs(x)
        out = self.loss(outputs, targets)
        parts = {name: value for name, value in out.parts.items() if name != "ce"}  # 0: no labels
        if not self.finite_step(out.total, parts, outputs):
            return
        optimizer.zero_grad()
        self.manual_backward(out.total)
        optimizer.step()
        self.record_losses(out.total, parts, x.shape[0])

    def training_step(self, batch: Any, batch_idx: int) -> None:
        """One generator step, then ``student_steps`` student steps (``batch``: a placeholder step index)."""
        generator_opt, student_opt = self.optimizers()
        self.generator_step(generator_opt)
        for _ in range(self.student_steps):
            self.student_step(student_opt)

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self.generator_losses.reset()

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        for name, value in self.generator_losses.means().items():
            self.log(f"train/{name}", value, sync_dist=True)
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
