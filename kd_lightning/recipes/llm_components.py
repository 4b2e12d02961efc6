"""The pieces ``kd-llm-distill`` assembles an LM scheme from: the scheme's constructor, its objective, the
teachers, the student, and how their tokenizers meet."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch import nn

from kd_lightning.engine.checks import constructor_arguments
from kd_lightning.engine.errors import ConfigError
from kd_lightning.engine.instantiate import build, build_partial, parameter_count
from kd_lightning.engine.weights import freeze
from kd_lightning.llm.served import ServedTeacher
from kd_lightning.llm.teacher_combinations import RowRouting, TeacherCombination
from kd_lightning.llm.vocab_checks import check_tokenizers, check_vocab_rows, embedding_rows, same_tokenizer
from kd_lightning.llm.vocab_mapping import VocabMapping
from kd_lightning.methods.lm.base import LMMethod


@dataclass
class Teachers:
    """The teachers of a run by name (one, ``llm.teacher.model``, is named ``teacher``), their tokenizers,
    and how several are combined (``llm.teacher.combine``; None for one teacher)."""

    models: dict[str, Any]
    tokenizers: dict[str, Any]
    combination: TeacherCombination | None

    @property
    def remote(self) -> bool:
        """Whether a teacher is behind an API (:class:`~kd_lightning.llm.remote.RemoteTeacher`)."""
        return any(not isinstance(model, nn.Module) for model in self.models.values())


def scheme_factory(cfg: DictConfig) -> tuple[Callable[..., LMMethod], DictConfig | None]:
    """The scheme's constructor (``llm.method`` without its own ``loss``) and the objective's config: the
    scheme's ``loss`` node if it ships one (DistiLLM-2), else ``llm.loss``; None if it reads no loss."""
    factory, own_loss = build_partial(
        cfg.llm.method, "llm.method", LMMethod, "kd_lightning.methods.lm.LMMethod", "loss"
    )
    return factory, own_loss if own_loss is not None else (cfg.llm.loss if factory.func.uses_loss else None)


def offer(factory: Callable[..., LMMethod], **ingredients: Any) -> LMMethod:
    """Call the scheme's constructor with the ingredients its constructor chain names."""
    names = constructor_arguments(factory.func)  # type: ignore[attr-defined]
    return factory(**{name: value for name, value in ingredients.items() if names is None or name in names})


def frozen(teacher: Any) -> Any:
    """A module teacher frozen; a remote one (:class:`~kd_lightning.llm.remote.RemoteTeacher`) as it is."""
    return freeze(teacher) if isinstance(teacher, nn.Module) else teacher


def serve_teacher(node: DictConfig, teacher: Any, loss: Any, student: nn.Module, datamodule: Any) -> ServedTeacher:
    """A remote teacher scoring every step (``llm.teacher.top_k`` log-probabilities per position), its requests
    sent as the data loaders read batches, ``llm.teacher.prefetch`` batches ahead of training."""
    vocab = loss.shared_vocab(student.get_output_embeddings().weight.shape[0], None)
    served = ServedTeacher(teacher, node.get("top_k", 20), loss.temperature, vocab, prefetch=node.get("prefetch", 2))
    if served.prefetch:  # Lightning reads one batch ahead itself
        datamodule.read_ahead_with(served.submit, served.prefetch - 1)
    return served


def teacher_names(node: DictConfig) -> list[str]:
    """The teachers' names as configured, before any is built."""
    return list(node.teachers) if node.get("teachers") is not None else ["teacher"]


def build_teachers(node: DictConfig) -> Teachers:
    """One teacher (``llm.teacher.model`` + ``tokenizer``) or several (``llm.teacher.teachers``: name ->
    ``model`` + ``tokenizer``, combined by ``llm.teacher.combine``), all frozen."""
    if node.get("teachers") is None:
        tokenizer = build(node.tokenizer, "llm.teacher.tokenizer")
        return Teachers({"teacher": frozen(build(node.model, "llm.teacher.model"))}, {"teacher": tokenizer}, None)
    if not node.teachers or node.get("combine") is None:
        raise ConfigError(
            "llm.teacher.teachers needs at least one teacher and llm.teacher.combine (routing or mixture)"
        )
    models, tokenizers = {}, {}
    for name, entry in node.teachers.items():
        key = f"llm.teacher.teachers.{name}"
        tokenizers[name] = build(entry.tokenizer, f"{key}.tokenizer")
        models[name] = frozen(build(entry.model, f"{key}.model"))
    return Teachers(models, tokenizers, build(node.combine, "llm.teacher.combine"))


def build_student(node: DictConfig, teacher: Any, tokenizer: Any) -> tuple[Any, Any]:
    """``(student, its tokenizer)``: the teacher's tokenizer unless ``llm.student.tokenizer`` gives the
    student its own, built first and handed to the student's builder (which sizes its vocabulary by it)."""
    if node.get("tokenizer") is None:
        return build(node, "llm.student", teacher=teacher), tokenizer
    student_tokenizer = build(node.tokenizer, "llm.student.tokenizer")
    rest = OmegaConf.create({k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if k != "tokenizer"})
    return build(rest, "llm.student", teacher=teacher, tokenizer=student_tokenizer), student_tokenizer


@dataclass
class Pairing:
    """How teacher and student tokenizers meet: the datamodule's tokenizer arguments, whether the teacher
    can read the student's tokens (to run, or to report ``val/kl_to_teacher``), and the shared vocabulary."""

    data: dict[str, Any]
    teacher_reads_student: bool
    vocab_size: int | None


def pair_tokenizers(loss: Any, teacher: Any, student: Any, tokenizer: Any, student_tokenizer: Any) -> Pairing:
    """Check the models against their tokenizers and the loss (None: the scheme reads no loss) against the
    pair; bind a cross-tokenizer loss. One tokenizer: token losses compare the shared vocabulary. A
    cross-tokenizer loss (``llm/loss=uld`` / ``gold``): data encoded for both tokenizers and aligned."""
    check_vocab_rows(teacher, tokenizer, "llm.teacher")
    check_vocab_rows(student, student_tokenizer, "llm.student")
    if loss is not None and loss.cross_tokenizer:
        mapping = VocabMapping.from_tokenizers(
            student_tokenizer, tokenizer, embedding_rows(student), embedding_rows(teacher)
        )
        loss.bind(mapping)
        return Pairing({"tokenizer": student_tokenizer, "teacher_tokenizer": tokenizer}, False, None)
    if same_tokenizer(student_tokenizer, tokenizer):
        vocab = check_tokenizers(teacher, student, tokenizer)
        if loss is not None and loss.vocab_size is None:
            loss.vocab_size = vocab
        return Pairing({"tokenizer": tokenizer}, True, vocab)
    if loss is not None:
        check_tokenizers(teacher, student, tokenizer, student_tokenizer)  # raises, naming the ways out
    return Pairing({"tokenizer": student_tokenizer}, False, len(student_tokenizer))


def pair_teachers(teachers: Teachers, losses: dict[str, Any], student: Any, student_tokenizer: Any) -> Pairing:
    """:func:`pair_tokenizers` for every teacher with its own loss; the datamodule arguments of the routing
    (one tokenizer per teacher when the loss is cross-tokenizer) or of the mixture (one shared tokenizer)."""
    combination, names = teachers.combination, list(teachers.models)
    for name in names:
        pair_tokenizers(losses[name], teachers.models[name], student, teachers.tokenizers[name], student_tokenizer)
        one_vocabulary = (
            same_tokenizer(teachers.tokenizers[name], student_tokenizer) and not losses[name].cross_tokenizer
        )
        if combination.needs_one_tokenizer and not one_vocabulary:
            raise ConfigError(
                f"llm.teacher.combine mixes the teachers' distributions token by token: teacher {name!r} must use "
                "the student's tokenizer with a same-vocabulary loss; route rows instead (RowRouting) for teachers "
                "with their own tokenizers"
            )
    data: dict[str, Any] = {"tokenizer": student_tokenizer}
    if isinstance(combination, RowRouting):
        combination.bind(names)
        data["routing"] = combination
        if losses[names[0]].cross_tokenizer:
            data["teacher_tokenizer"] = [teachers.tokenizers[name] for name in names]
    return Pairing(data, False, None)


def parameter_counts(student: nn.Module, method: LMMethod, teachers: Teachers) -> dict[str, int]:
    """``params/student``, ``params/trainable`` (all of the student, or its LoRA adapters) and the in-process
    teachers': ``params/teacher``, or ``params/teacher/<name>`` for several."""
    params = {"params/student": parameter_count(student)}
    params["params/trainable"] = sum(p.numel() for p in method.trainable_parameters())
    modules = {name: m for name, m in teachers.models.items() if isinstance(m, nn.Module)}
    prefix = "params/teacher" if teachers.combination is None else "params/teacher/"
    params |= {
        prefix + ("" if teachers.combination is None else name): parameter_count(m) for name, m in modules.items()
    }
    return params
