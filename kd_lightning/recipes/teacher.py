"""Teachers for a recipe: weights from a checkpoint, a pretrained factory, the cache, or a supervised fit;
the scratch-student baseline; and ``kd-train``."""

from __future__ import annotations

import logging
import shlex
import shutil
from pathlib import Path

import lightning as L
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from torch import nn

from kd_lightning.engine.caching.store import (
    cache_key,
    code_digest,
    data_identity,
    file_digest,
    read_verified_json,
    trainer_identity,
    weight_files,
    weight_files_digest,
    write_safetensors_atomic,
    write_verified_json,
)
from kd_lightning.engine.checks import check_class_counts, check_fit, check_run_options, check_trainer
from kd_lightning.engine.class_names import align_classes, data_class_names
from kd_lightning.engine.errors import ConfigError
from kd_lightning.engine.instantiate import build
from kd_lightning.engine.resume import side_rng
from kd_lightning.engine.run_dir import check_run_dir
from kd_lightning.engine.threads import set_cpu_threads
from kd_lightning.engine.weights import load_weights
from kd_lightning.recipes.fit import FitResult, fit_supervised
from kd_lightning.teacher import Provenance
from kd_lightning.teacher_inputs import adapted

log = logging.getLogger(__name__)


def teacher_configs(cfg: DictConfig) -> dict[str, DictConfig]:
    """The teachers a run's method distils from, by name (``method.teachers``; summaries written before
    methods were a config group have the single ``teacher``)."""
    if "method" in cfg:
        return dict((cfg.method.get("teachers") or {}).items())
    return {"teacher": cfg.teacher}


def config_key(name: str) -> str:
    """Where teacher ``name`` is configured: ``teacher`` (the default group) or ``method.teachers.<name>``."""
    return "teacher" if name == "teacher" else f"method.teachers.{name}"


def input_adapter(teacher_cfg: DictConfig, name: str) -> nn.Module | None:
    """Teacher ``name``'s input adapter (``teacher.input``, :mod:`kd_lightning.teacher_inputs`), None without one."""
    return build(teacher_cfg.input, f"{config_key(name)}.input") if teacher_cfg.get("input") else None


def check_teacher_tokenizer(data_cfg: DictConfig, teacher_cfgs: dict[str, DictConfig]) -> None:
    """With ``data.teacher_tokenizer`` set the batches carry the teacher's own tokenisation beside the
    student's, which a teacher reads only through an input adapter (``teacher.input: TokenInput``): without one
    on any teacher, every teacher would read the student's token ids, so the run is refused."""
    tokenizer = data_cfg.get("teacher_tokenizer")
    if not tokenizer or not teacher_cfgs or any(node.get("input") for node in teacher_cfgs.values()):
        return
    key = config_key(next(iter(teacher_cfgs)))
    raise ConfigError(
        f"data.teacher_tokenizer={tokenizer} tokenises every row for the teacher too, but {key}.input is null, so "
        f"the teacher would read the student's token ids: set {key}.input="
        "'{_target_: kd_lightning.teacher_inputs.TokenInput}' (or data.teacher_tokenizer=null if the teacher "
        "shares the student's tokenizer)"
    )


def train_teacher(
    cfg: DictConfig, teacher_cfg: DictConfig, model: nn.Module, out_dir: Path, input: nn.Module | None = None
) -> FitResult:
    """Train the teacher ``model`` supervised with its ``fit`` recipe, reading its inputs through ``input`` (the
    teacher's input adapter, as it will when distilled from); loads its best weights."""
    fit = teacher_cfg.fit
    trained = adapted(model, input)
    result = fit_supervised(cfg, trained, out_dir, fit.max_epochs, fit.optimizer, fit.get("scheduler"))
    if result.best_checkpoint:
        load_weights(trained, result.best_checkpoint, key="teacher.checkpoint")
    return result


def obtain_teacher(
    cfg: DictConfig,
    teacher_cfg: DictConfig,
    name: str,
    model: nn.Module,
    out_dir: Path,
    input: nn.Module | None = None,
) -> Provenance:
    """Weights for the teacher ``model`` (loaded in place): ``checkpoint``; else, without a ``fit``
    recipe, the weights its ``_target_`` built (a pretrained factory); else the cache; else trained (reading
    its inputs through its adapter ``input``, :func:`input_adapter`) and cached."""
    key = config_key(name)
    if teacher_cfg.checkpoint:
        load_weights(model, teacher_cfg.checkpoint, key=f"{key}.checkpoint")
        log.info("%s: weights from %s.checkpoint=%s, used as given", name, key, teacher_cfg.checkpoint)
        return Provenance(f"checkpoint {teacher_cfg.checkpoint}")
    supplied = weight_files(teacher_cfg.model)
    if supplied and not teacher_cfg.get("fine_tune", False):
        given = ", ".join(f"{key}.model.{field}={path}" for field, path in supplied.items())
        log.info("%s: weights from %s, used as given (%s.fine_tune=true fine-tunes them first)", name, given, key)
        return Provenance(f"as given: {given}")
    if not teacher_cfg.get("fit"):
        return Provenance(f"as built by {teacher_cfg.model._target_}")
    entry_key = cache_key(
        model=teacher_cfg.model,
        **file_key(teacher_cfg.model),
        code=code_digest(model),
        fit=teacher_cfg.fit,
        data=data_identity(cfg.data),
        trainer=trainer_identity(cfg.trainer),
        seed=cfg.seed,
        **({"input": teacher_cfg.input} if input is not None else {}),
    )
    entry = Path(cfg.paths.cache_dir) / "teachers" / entry_key
    if cached_teacher(entry, model):
        return Provenance(f"cache {entry / 'model.safetensors'}")
    log.info("No %s.checkpoint and none cached: training %s (%s epochs)", key, name, teacher_cfg.fit.max_epochs)
    with side_rng():  # the run's own draws do not depend on whether the teacher was cached
        L.seed_everything(cfg.seed, workers=True)
        # Initialised here from the seed, so the cached weights are a function of the cache key alone (not
        # of what the run drew before building this model, e.g. another student).
        model.load_state_dict(build(teacher_cfg.model, f"{key}.model").state_dict())
        L.seed_everything(cfg.seed, workers=True)
        result = train_teacher(cfg, teacher_cfg, model, out_dir / name, input)
    weights = entry / "model.safetensors"
    write_safetensors_atomic(weights, model.state_dict())
    meta = {
        "sha256": file_digest(weights),
        "val_acc_best": result.val_acc_best,
        "test_acc": result.test_acc,
        "fit_seconds": result.seconds,
        "config": OmegaConf.to_container(teacher_cfg, resolve=True),
    }
    write_verified_json(entry / "meta.json", meta)
    return Provenance(f"trained, cached at {weights}", result.seconds)


def file_key(model_cfg: DictConfig) -> dict[str, dict[str, str]]:
    """The cache-key part that covers the bytes of the model's weight files (none: no part, so the keys of
    models without such files stay as they were)."""
    digests = weight_files_digest(model_cfg)
    return {"files": digests} if digests else {}


def cached_teacher(entry: Path, model: nn.Module) -> bool:
    """Load the cached teacher at ``entry`` into ``model`` if it is there and intact (its weights' sha256 as
    recorded); a damaged entry is removed with a warning (the teacher is then trained again)."""
    weights = entry / "model.safetensors"
    meta = read_verified_json(entry / "meta.json")
    if meta is None or not weights.is_file():
        return False
    if file_digest(weights) != meta.get("sha256"):
        log.warning("cached teacher %s is damaged (checksum mismatch); training it again", weights)
        shutil.rmtree(entry, ignore_errors=True)
        return False
    log.info("Reusing cached teacher %s", weights)
    load_weights(model, weights, key="teacher cache")
    return True


def scratch_baseline(cfg: DictConfig, out_dir: Path) -> dict[str, float]:
    """The same student, data (labelled only), budget and seed trained supervised (``method=supervised``); cached."""
    label_smoothing = cfg.loss.get("label_smoothing", 0.0)
    # Seeded as kd-distill method=supervised seeds (before building the student, again before fitting), so
    # the baseline is that run exactly and a function of its cache key alone.
    L.seed_everything(cfg.seed, workers=True)
    student = build(cfg.student.model, "student.model")
    key = cache_key(
        model=cfg.student.model,
        **file_key(cfg.student.model),
        code=code_digest(student),
        data=data_identity(cfg.data),
        optimizer=cfg.optimizer,
        scheduler=cfg.scheduler,
        epochs=cfg.trainer.max_epochs,
        trainer=trainer_identity(cfg.trainer),
        label_smoothing=label_smoothing,
        seed=cfg.seed,
    )
    path = Path(cfg.paths.cache_dir) / "scratch" / f"{key}.json"
    cached = read_verified_json(path)
    if cached is not None:
        return cached
    L.seed_everything(cfg.seed, workers=True)
    result = fit_supervised(
        cfg,
        student,
        out_dir / "scratch",
        cfg.trainer.max_epochs,
        cfg.optimizer,
        cfg.scheduler or None,
        label_smoothing=label_smoothing,
    )
    record = {"val_acc_best": result.val_acc_best, "test_acc": result.test_acc, "fit_seconds": result.seconds}
    write_verified_json(path, record)
    return record


def distill_command(checkpoint: str) -> str:
    """The kd-distill command that distils from the checkpoint kd-train wrote: the same teacher and data
    choices and every override of theirs on kd-train's command line (model settings, data paths), so it runs
    as printed."""
    hydra = HydraConfig.get()
    choices = [f"{group}={hydra.runtime.choices[group]}" for group in ("data", "teacher")]
    kept = [
        override
        for override in hydra.overrides.task
        if override.lstrip("+~").startswith(
            ("data.", "teacher.model.", "model@teacher.model=", "teacher.input", "seed=")
        )
    ]
    return " ".join(["kd-distill", *choices, *(shlex.quote(o) for o in kept), f"teacher.checkpoint={checkpoint}"])


def train_model(cfg: DictConfig) -> float:
    """``kd-train``: supervised training of the ``teacher`` model with its fit recipe; prints the checkpoint."""
    out_dir = Path(cfg.paths.output_dir)
    check_run_options(cfg)
    check_trainer(cfg.trainer)
    check_run_dir(out_dir, resuming=False)
    L.seed_everything(cfg.seed, workers=True)
    if not cfg.teacher.get("fit"):
        raise ConfigError(
            "kd-train trains a model with its teacher.fit recipe, and this teacher config has none; add one"
        )
    check_fit(cfg.teacher.fit, "teacher.fit")
    check_teacher_tokenizer(cfg.data, {"teacher": cfg.teacher})
    model = build(cfg.teacher.model, "teacher.model")
    input = input_adapter(cfg.teacher, "teacher")
    set_cpu_threads(cfg.cpu_threads, [model], "cpu_threads")
    datamodule = build(cfg.data, "data")
    example = datamodule.example_input()
    check_class_counts(
        example, cfg.data.num_classes, {"teacher": adapted(model, input)}, {"teacher": cfg.teacher.model}
    )
    align_classes({"teacher": model}, data_class_names(datamodule))
    result = train_teacher(cfg, cfg.teacher, model, out_dir, input)
    print(
        f"kd-train: val acc (best) {100 * result.val_acc_best:.2f}%, test acc {100 * result.test_acc:.2f}% "
        f"in {result.seconds:.1f} s\ncheckpoint: {result.best_checkpoint}\n"
        f"distill from it with: {distill_command(result.best_checkpoint)}"
    )
    return result.val_acc_best
