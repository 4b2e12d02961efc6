"""What an LM scheme declares it can train, checked before any model is built (:class:`SchemeRules`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from kd_lightning.engine.errors import ConfigError
from kd_lightning.llm.hidden import check_hidden_support
from kd_lightning.llm.protocol import SUPERVISED_SOURCES, TokenLoss, TokenSource


class SchemeRules:
    """A scheme's declarations and the checks ``kd-llm-distill`` runs from them before building models: which
    teachers it takes (``teacher_range``), whether a logit cache or a served teacher may replace the live
    teacher (``takes_logit_cache``, ``takes_served_teacher``), whether ``llm.loss`` is its objective
    (``uses_loss``), which token sources it trains on (``token_sources``) and whether ``llm/hidden`` may add
    its term (``takes_hidden``). Subclasses override the attributes and extend the class methods."""

    teacher_range: tuple[int, int | None] = (1, 1)
    takes_logit_cache: bool = True
    takes_served_teacher: bool = True
    uses_loss: bool = True
    token_sources: frozenset[TokenSource] = SUPERVISED_SOURCES  # dataset text: references or teacher-written
    takes_hidden: bool = True

    @classmethod
    def check_config(cls, loss: TokenLoss | None, teachers: Sequence[str], cached: bool, remote: bool) -> None:
        """Refuse what this scheme cannot train (``teachers``: their names; ``cached``: ``llm/teacher_cache``
        is set; ``remote``: a teacher is behind an API), naming the keys; run before any model is built."""
        fewest, most = cls.teacher_range
        name = cls.config_name()
        if len(teachers) < fewest:
            raise ConfigError(f"llm/method={name} needs a teacher (llm/teacher) or a logit cache (llm/teacher_cache)")
        if most is not None and len(teachers) > most:
            raise ConfigError(
                f"llm.teacher.teachers names {len(teachers)} teachers {list(teachers)} but llm/method={name} takes "
                f"at most {most}: use llm/method=multi_teacher (or one teacher: llm/teacher=...)"
            )
        if cached and not cls.takes_logit_cache:
            raise ConfigError(
                f"llm/teacher_cache holds one teacher's outputs for dataset sequences; llm/method={cls.config_name()} "
                "runs the teachers live: set llm/teacher_cache=none"
            )
        serving = remote and not cached and cls.uses_loss and loss is not None and loss.needs_teacher
        if serving and not cls.takes_served_teacher:
            raise ConfigError(
                f"llm/method={name} runs its teachers in process; a served teacher (llm/teacher=remote) scores "
                "the steps of llm/method=token_kd and on_policy: set llm/teacher_cache=top_k, or distil "
                "black-box: kd-llm-generate llm/teacher=remote, then llm/method=sft llm/data=teacher_text"
            )
        if cls.uses_loss and loss is not None:
            if not any(cls.token_sources & sources for sources in loss.reads.values()):
                trains_on = ", ".join(sorted(source.value for source in cls.token_sources))
                reads = ", ".join(sorted({source.value for sources in loss.reads.values() for source in sources}))
                raise ConfigError(
                    f"llm/loss ({type(loss).__name__}) reads {reads} tokens only but llm/method={name} trains on "
                    f"{trains_on} tokens: use llm/method=on_policy llm.method.lmbda=1, or another llm/loss"
                )
            if not loss.needs_teacher:
                raise ConfigError(
                    "llm.loss.alpha=0 distils nothing (cross-entropy only); to fine-tune on teacher-written text "
                    "use llm/method=sft, else set llm.loss.alpha > 0"
                )
            if cached and loss.cross_tokenizer:
                raise ConfigError(
                    "llm/teacher_cache stores the teacher's top-k over its own vocabulary at the student's "
                    "positions; with different tokenizers (llm/loss=uld or gold) set llm/teacher_cache=none"
                )
            if (cached or remote) and not loss.reads_top_k:
                where = "llm/teacher_cache=top_k" if cached else "llm/teacher=remote"
                raise ConfigError(
                    f"{where} gives the teacher's top-k log-probabilities, which llm/loss ({type(loss).__name__}) "
                    "cannot read (it needs the teacher's full distribution or its tokenizer): use a live teacher or "
                    "another llm/loss (forward_kl, reverse_kl, jsd, skl, srkl, tvd)"
                )

    @classmethod
    def check_hidden(cls, cached: bool, remote: bool, cross_tokenizer: bool) -> None:
        """Refuse ``llm/hidden`` where this scheme cannot read one live teacher's hidden states."""
        check_hidden_support(cls.config_name(), cls.takes_hidden, cached, remote, cross_tokenizer)

    @classmethod
    def check_options(cls, options: Mapping[str, Any], models: Mapping[str, nn.Module] | None = None) -> None:
        """Checks of the scheme's own ``llm.method.*`` options, before any model is built. Nothing here."""

    @classmethod
    def metric_names(cls, loss: nn.Module | None, teachers: Sequence[str]) -> set[str]:
        names = {"train/loss", "train/loss_ce", "train/loss_distill", "val/loss", "val/ppl"}
        if teachers:
            names.add("val/kl_to_teacher")
        return names | super().metric_names(loss, teachers)

    @classmethod
    def config_name(cls) -> str:
        """The scheme's ``conf/llm/method`` name, for messages (``scheme``; else the class name)."""
        return cls.__dict__.get("scheme") or cls.__name__.lower()
