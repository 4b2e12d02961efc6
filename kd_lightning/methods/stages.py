"""Multi-stage methods: a sequence of single-stage runs, each stage's best checkpoint teaching the next (or
its final student the next one's starting point: FitNets' hint stage).

A multi-stage method is configured like any method (``conf/method/<name>.yaml``, ``_recursive_: false``)
but is not a LightningModule: it lists its :class:`Stage` s and the recipe
(:mod:`kd_lightning.recipes.stages`) runs each one as a ``kd-distill`` run of its own (its own run
directory, checkpoints, summary; resumable), then summarises them together.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig

from kd_lightning.engine.errors import ConfigError, check_type


@dataclass
class Stage:
    """One stage: the single-stage ``method`` config it runs (its ``teachers`` included), the ``student``
    model config it trains, and the stages whose best checkpoints become teachers (teacher name -> stage).

    ``student_from``: the earlier stage whose final student (its ``last.ckpt``: the weights at the end of that
    stage's training) this stage's student starts from, instead of a fresh initialisation (the recipe sets
    ``student.checkpoint``); ``overrides``: values of the run's config for this stage alone, by dotted key
    (``{"trainer.max_epochs": 5, "loss.alpha": 1.0}``)."""

    name: str
    method: DictConfig
    student: DictConfig
    teachers_from: dict[str, str] = field(default_factory=dict)
    student_from: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)


class MultiStageMethod:
    """Base of multi-stage methods. Subclasses define :meth:`stages`; the recipe does the rest.

    ``ensemble``: the summary also reports the test accuracy of the average of every stage's predicted
    probabilities (``test/acc_ensemble``), for stages that all solve the task (born-again generations).
    """

    ensemble: bool = False

    def stages(self, cfg: DictConfig) -> list[Stage]:
        raise NotImplementedError


def method_of(config: Any, key: str) -> DictConfig:
    """A single-stage method config given to a multi-stage method (``method.<key>``), checked."""
    if not isinstance(config, DictConfig) or "_target_" not in config:
        raise ConfigError(
            f"method.{key} must be a method config with a _target_ (e.g. the contents of conf/method/kd.yaml)"
        )
    return config


def frozen_from(model: DictConfig) -> DictConfig:
    """The teacher config of a model trained by an earlier stage: weights are put in by the recipe."""
    return DictConfig({"model": model, "checkpoint": None, "fit": None})


class BornAgain(MultiStageMethod):
    """Born-again networks (Furlanello et al. 2018, "Born-Again Neural Networks").

    Generation 0 is the student's architecture trained alone (``first``: ``method=supervised``, i.e. the
    scratch student); generation k + 1 is the same architecture distilled from generation k's best
    checkpoint with the run's ``loss`` (``each``: the KD method), ``generations`` models in all. The summary
    reports every generation and the ensemble of generations, ``p = 1/G sum_g softmax(z_g)`` (BANE).
    """

    ensemble = True

    def __init__(self, generations: int, first: DictConfig, each: DictConfig) -> None:
        if not isinstance(generations, int) or generations < 2:
            raise ConfigError(
                f"method.generations={generations!r}: born-again needs at least 2 generations (0 trained alone, "
                "1 distilled from it); set method.generations=3"
            )
        self.generations = generations
        self.first = method_of(first, "first")
        self.each = method_of(each, "each")

    def stages(self, cfg: DictConfig) -> list[Stage]:
        student = cfg.student.model
        stages = [Stage("generation_0", self.first, student)]
        for k in range(1, self.generations):
            method = self.each.copy()
            method.teachers = {"teacher": frozen_from(student)}
            stages.append(Stage(f"generation_{k}", method, student, {"teacher": f"generation_{k - 1}"}))
        return stages


class AssistantChain(MultiStageMethod):
    """Teacher-assistant knowledge distillation (Mirzadeh et al. 2020, TAKD).

    The teacher (``teacher``: checkpoint, cache or fit as for KD) teaches the first assistant, each
    assistant the next, the last assistant the student: ``T -> A_1 -> ... -> A_n -> S``, each arrow a KD
    stage (``each``, the run's ``loss``) from the previous stage's best checkpoint. ``assistants``: model
    configs by name, in chain order, sized between teacher and student (the paper's intermediate size).
    """

    def __init__(self, assistants: DictConfig, each: DictConfig) -> None:
        if not isinstance(assistants, DictConfig) or not assistants:
            raise ConfigError(
                "method.assistants is empty: give at least one assistant model config, e.g. "
                "method.assistants.assistant={_target_: kd_lightning.models.ConvNet1D, ...}"
            )
        for name, model in assistants.items():
            if not isinstance(model, DictConfig) or "_target_" not in model:
                raise ConfigError(f"method.assistants.{name} must be a model config with a _target_")
        self.assistants = assistants
        self.each = method_of(each, "each")

    def stages(self, cfg: DictConfig) -> list[Stage]:
        stages: list[Stage] = []
        previous: str | None = None
        chain = [(str(name), model) for name, model in self.assistants.items()] + [("student", cfg.student.model)]
        for name, model in chain:
            method = self.each.copy()
            if previous is None:
                method.teachers = {"teacher": cfg.teacher}
                stages.append(Stage(name, method, model))
            else:
                method.teachers = {"teacher": frozen_from(self.assistants[previous])}
                stages.append(Stage(name, method, model, {"teacher": previous}))
            previous = name
        return stages


class FitNetsTwoStage(MultiStageMethod):
    r"""FitNets' two-stage training (Romero et al. 2015, "FitNets: Hints for Thin Deep Nets", §2.2).

    Stage ``hint`` trains the student for ``hint_epochs`` epochs on the hint term alone (``loss.alpha = 1``,
    every other term's weight 0; the hint keeps its configured weight):

    .. math:: W^*_{Guided}, W^*_r = \arg\min \tfrac12 \lVert u_h(x; W_{Hint}) - r(v_g(x; W_{Guided}); W_r)\rVert^2

    so only the student layers up to the guided layer and the regressor :math:`r` learn. Stage ``distill``
    then trains with the run's ``loss`` as configured for ``trainer.max_epochs`` epochs, its student starting
    from the hint stage's final weights (the regressor starts afresh: the paper's second stage has none).
    ``hint``: the name of the hint term in ``loss.terms``; ``each``: the KD method both stages run.
    """

    def __init__(self, hint: str, hint_epochs: int, each: DictConfig) -> None:
        check_type(hint, str, "method.hint")
        if not isinstance(hint_epochs, int) or isinstance(hint_epochs, bool) or hint_epochs < 1:
            raise ConfigError(f"method.hint_epochs={hint_epochs!r} must be an integer >= 1 (epochs of the hint stage)")
        self.hint = hint
        self.hint_epochs = hint_epochs
        self.each = method_of(each, "each")

    def stages(self, cfg: DictConfig) -> list[Stage]:
        terms = cfg.loss.get("terms") or {}
        if self.hint not in terms:
            raise ConfigError(
                f"method.hint={self.hint!r} is not a term of the loss (loss.terms: {sorted(terms)}); use it with "
                "loss=fitnet or set method.hint to the hint term's name"
            )
        configured = cfg.loss.get("weights") or {}
        weights = {str(name): float(configured.get(name, 1.0)) if name == self.hint else 0.0 for name in terms}
        alone = {"loss.alpha": 1.0, "loss.weights": weights, "trainer.max_epochs": self.hint_epochs}
        student = cfg.student.model
        return [
            Stage("hint", self.each.copy(), student, overrides=alone),
            Stage("distill", self.each.copy(), student, student_from="hint"),
        ]
