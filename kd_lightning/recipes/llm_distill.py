"""``kd-llm-distill`` (``python -m kd_lightning.cli.llm_distill``): distil a causal-LM teacher into a student.

Top to bottom: seed -> loss -> tokenizer, teacher, student (built from the teacher; with its own tokenizer
when ``llm.student.tokenizer`` is set) -> tokenizer pairing (one vocabulary, or cross-tokenizer alignment)
-> data -> mode (``conf/llm/mode``: e.g. teacher top-k cached, teacher dropped) -> module -> fit -> summary.json.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig, OmegaConf
from torch import nn

from kd_lightning.engine.caching.store import write_json_atomic
from kd_lightning.engine.errors import ConfigError
from kd_lightning.engine.instantiate import build, build_trainer, log_run_config, parameter_count
from kd_lightning.engine.run_dir import announce, start_run
from kd_lightning.engine.threads import set_cpu_threads
from kd_lightning.engine.weights import freeze
from kd_lightning.llm.contrastive import DistiLLM2Loss, student_responses
from kd_lightning.llm.cross_tokenizer import VocabMapping
from kd_lightning.llm.models import check_tokenizers, check_vocab_rows, embedding_rows, same_tokenizer
from kd_lightning.llm.modes import CachedTeacher, TrainingMode
from kd_lightning.llm.multi_teacher import RowRouting, TeacherCombination
from kd_lightning.methods.llm import LLMDistillationModule
from kd_lightning.recipes.fit import sync_csv_columns

log = logging.getLogger(__name__)


@dataclass
class TokenizerPairing:
    """How teacher and student tokenizers meet: the datamodule's tokenizer arguments and whether the
    teacher runs at all (not for fine-tuning a student whose tokenizer differs: nothing to compare)."""

    data: dict[str, Any]
    teacher_runs: bool


@dataclass
class Teachers:
    """The teachers of a run by name (one, ``llm.teacher.model``, is named ``teacher``), their tokenizers,
    and how several are combined (``llm.teacher.combine``; None for one teacher)."""

    models: dict[str, Any]
    tokenizers: dict[str, Any]
    combination: TeacherCombination | None


def frozen(teacher: Any) -> Any:
    """A module teacher frozen; a remote one (:class:`~kd_lightning.llm.remote.RemoteTeacher`) as it is."""
    return freeze(teacher) if isinstance(teacher, nn.Module) else teacher


def check_remote(teachers: Teachers, loss: Any, mode: TrainingMode) -> None:
    """A remote teacher scores tokens only through the logit cache (or writes text: black-box)."""
    remote = [name for name, model in teachers.models.items() if not isinstance(model, nn.Module)]
    if not remote:
        return
    if teachers.combination is not None:
        raise ConfigError(f"llm.teacher.teachers: {remote} are remote; several teachers must be in-process models")
    if loss.needs_teacher and not isinstance(mode, CachedTeacher):
        raise ConfigError(
            "llm/teacher=remote scores tokens once into the logit cache: set llm/mode=teacher_cache (grey-box, "
            "top-k), or distil black-box: kd-llm-generate llm/teacher=remote, then llm/loss=sft llm/data=teacher_text"
        )


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


def pair_teachers(teachers: Teachers, losses: dict[str, Any], student: Any, student_tokenizer: Any) -> TokenizerPairing:
    """:func:`pair_tokenizers` for every teacher with its own loss; the datamodule arguments of the routing
    (one tokenizer per teacher when the loss is cross-tokenizer) or of the mixture (one shared tokenizer)."""
    combination, names = teachers.combination, list(teachers.models)
    for name in names:
        pair_tokenizers(losses[name], teachers.models[name], student, teachers.tokenizers[name], student_tokenizer)
        if not losses[name].needs_teacher:
            raise ConfigError("several teachers with llm.loss.alpha=0: nothing is distilled; set llm.loss.alpha > 0")
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
    return TokenizerPairing(data, True)


def build_student(node: DictConfig, teacher: Any, tokenizer: Any) -> tuple[Any, Any]:
    """``(student, its tokenizer)``: the teacher's tokenizer unless ``llm.student.tokenizer`` gives the
    student its own, built first and handed to the student's builder (which sizes its vocabulary by it)."""
    if node.get("tokenizer") is None:
        return build(node, "llm.student", teacher=teacher), tokenizer
    student_tokenizer = build(node.tokenizer, "llm.student.tokenizer")
    rest = OmegaConf.create({k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if k != "tokenizer"})
    return build(rest, "llm.student", teacher=teacher, tokenizer=student_tokenizer), student_tokenizer


def pair_tokenizers(loss: Any, teacher: Any, student: Any, tokenizer: Any, student_tokenizer: Any) -> TokenizerPairing:
    """Check the models against their tokenizers and the loss against the pair; bind a cross-tokenizer loss.

    One tokenizer: token losses compare the shared vocabulary (``llm.loss.vocab_size`` set to it). A
    cross-tokenizer loss (``llm/loss=uld`` / ``gold``): data encoded for both tokenizers and aligned.
    Different tokenizers with a same-vocabulary loss: only ``alpha = 0`` (fine-tuning on teacher text) works.
    """
    check_vocab_rows(teacher, tokenizer, "llm.teacher")
    check_vocab_rows(student, student_tokenizer, "llm.student")
    if loss.cross_tokenizer:
        loss.bind(
            VocabMapping.from_tokenizers(student_tokenizer, tokenizer, embedding_rows(student), embedding_rows(teacher))
        )
        return TokenizerPairing({"tokenizer": student_tokenizer, "teacher_tokenizer": tokenizer}, loss.needs_teacher)
    if same_tokenizer(student_tokenizer, tokenizer):
        if loss.vocab_size is None:
            loss.vocab_size = check_tokenizers(teacher, student, tokenizer)
        return TokenizerPairing({"tokenizer": tokenizer}, True)
    if loss.needs_teacher:
        check_tokenizers(teacher, student, tokenizer, student_tokenizer)  # raises, naming the ways out
    return TokenizerPairing({"tokenizer": student_tokenizer}, False)


def distill(cfg: DictConfig) -> dict[str, Any]:
    """Run one LM distillation job; returns the summary (metrics included), also written to summary.json."""
    start = time.perf_counter()
    run = start_run(cfg)
    if run.finished is not None:  # a requeued job of a run that already finished
        return run.finished
    out_dir, ckpt_path = run.out_dir, run.ckpt_path
    loss = build(cfg.llm.loss, "llm.loss")
    mode: TrainingMode = build(cfg.llm.mode, "llm.mode")
    teachers = build_teachers(cfg.llm.teacher)
    check_remote(teachers, loss, mode)
    teacher, tokenizer = next(iter(teachers.models.values())), next(iter(teachers.tokenizers.values()))
    student, student_tokenizer = build_student(cfg.llm.student, teacher, tokenizer)
    set_cpu_threads(cfg.cpu_threads, [*teachers.models.values(), student], "cpu_threads")
    if isinstance(mode, CachedTeacher) and (loss.cross_tokenizer or teachers.combination is not None):
        raise ConfigError(
            "llm/mode=teacher_cache caches one teacher's top-k over the student's tokens; with several teachers "
            "or a cross-tokenizer loss run the teachers live (llm/mode=off_policy or on_policy)"
        )
    if teachers.combination is None:
        pairing = pair_tokenizers(loss, teacher, student, tokenizer, student_tokenizer)
        losses = None
    else:
        losses = {name: loss if i == 0 else build(cfg.llm.loss, "llm.loss") for i, name in enumerate(teachers.models)}
        pairing = pair_teachers(teachers, losses, student, student_tokenizer)
    datamodule = build(cfg.llm.data, "llm.data", **pairing.data)
    if isinstance(loss, DistiLLM2Loss):  # the student's own responses, generated once before training
        datamodule.setup()
        responses = student_responses(
            student,
            student_tokenizer,
            datamodule.prompts["train"],
            loss.generation,
            Path(cfg.paths.cache_dir) / "distillm2",
        )
        datamodule.add_student_responses(responses)
    trainer: L.Trainer = build_trainer(cfg)

    cache = mode.teacher_cache(teacher, datamodule, loss, trainer, Path(cfg.paths.cache_dir))
    single_module = teachers.combination is None and isinstance(teacher, nn.Module)
    params = {"params/student": parameter_count(student)}
    if isinstance(teacher, nn.Module):
        params["params/teacher"] = parameter_count(teacher)
    if teachers.combination is not None:
        params.update({f"params/teacher/{name}": parameter_count(m) for name, m in teachers.models.items()})
    lora = OmegaConf.to_container(cfg.llm.lora, resolve=True) if cfg.llm.lora else None
    module = LLMDistillationModule(
        student=student,
        loss=loss,
        optimizer=build(cfg.optimizer, "optimizer"),
        # With alpha = 0 (SFT on teacher text) the teacher never runs in training, only to report
        # val/kl_to_teacher.
        teacher=teacher if cache is None and pairing.teacher_runs and single_module else None,
        scheduler=build(cfg.scheduler, "scheduler") if cfg.scheduler else None,
        lmbda=mode.lmbda,
        generation=mode.generation,
        logit_cache=cache,
        lora=lora,
        pad_token_id=student_tokenizer.pad_token_id,
        eos_token_id=student_tokenizer.eos_token_id,
        seed=cfg.seed,
        save_teacher=cfg.save_teacher,
        aligned=datamodule.encoder if loss.cross_tokenizer else None,
        teachers=teachers.models if teachers.combination is not None else None,
        combination=teachers.combination,
        losses=losses,
    )
    params["params/trainable"] = sum(p.numel() for p in module.trainable_parameters())
    log_run_config(trainer, cfg, params)

    fit_start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    if "val/loss" not in trainer.callback_metrics:  # max_steps ended the fit before any validation
        sync_csv_columns(trainer)
        trainer.validate(module, datamodule=datamodule, verbose=False)
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    summary = {
        "metrics": {name: float(value) for name, value in trainer.callback_metrics.items()},
        **params,
        "mode": mode.name,
        "logit_cache": str(cache.path) if cache else None,
        "best_checkpoint": best,
        "seconds": {"fit": time.perf_counter() - fit_start, "total": time.perf_counter() - start},
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    if trainer.is_global_zero:
        write_json_atomic(out_dir / "summary.json", summary)
        announce(f"results: {out_dir} (summary.json, checkpoints/)")
    log.info("metrics: %s", {name: round(value, 4) for name, value in summary["metrics"].items()})
    return summary
