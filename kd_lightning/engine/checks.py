"""Checks that need no training: run before any teacher is trained or any step is taken."""

from __future__ import annotations

import difflib
import inspect
import math
import os
from collections.abc import Callable, Collection, Mapping
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from kd_lightning.engine.batches import Inputs
from kd_lightning.engine.errors import ConfigError, check_type
from kd_lightning.engine.instantiate import build
from kd_lightning.engine.weights import in_mode


def check_class_counts(
    example: Inputs,
    num_classes: int,
    models: Mapping[str, nn.Module],
    configs: Mapping[str, Any] | None = None,
) -> None:
    """Run one example batch through each model (by config key) and compare its logits to
    ``data.num_classes``; the error names the argument of the model's config (``configs``) that sets them."""
    for key, model in models.items():
        try:
            with in_mode(model), torch.no_grad():
                out = model(example)
        except (RuntimeError, ValueError, TypeError, IndexError) as error:  # the input does not fit the model
            target = type(model).__name__
            first = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
            raise ConfigError(
                f"{key}.model ({target}) cannot read the data's batches ({describe(example)}): {first}; pick a "
                f"{key} config for this data (e.g. {key.split('.')[0]}=<a model of conf/{key.split('.')[0]}>)"
            ) from None
        check_output_shape(out, key)
        if out.shape[-1] != num_classes:
            field = class_count_field((configs or {}).get(key), out.shape[-1])
            raise ConfigError(
                f"{key}.model outputs {out.shape[-1]} classes but data.num_classes={num_classes}; "
                f"set {key}.model.{field}={num_classes} (or pick matching data)"
            )


def describe(example: Inputs) -> str:
    """The shape of an example batch, for messages: ``input (2, 1, 40)`` or each key's shape."""
    if isinstance(example, torch.Tensor):
        return f"input {tuple(example.shape)}"
    if isinstance(example, Mapping):
        return ", ".join(f"{k} {tuple(v.shape)}" for k, v in example.items() if isinstance(v, torch.Tensor))
    return type(example).__name__


def class_count_field(model_cfg: Any, produced: int) -> str:
    """The model config's argument that sets its number of outputs: the one holding ``produced`` (a name with
    "class" first, e.g. ``classes``, ``n_classes``), else ``num_classes``."""
    items = dict(model_cfg.items()) if isinstance(model_cfg, Mapping | DictConfig) else {}
    candidates = [name for name, value in items.items() if isinstance(value, int) and value == produced]
    candidates.sort(key=lambda name: "class" not in name)
    return candidates[0] if candidates else "num_classes"


def check_output_shape(out: torch.Tensor, key: str) -> None:
    """A classifier's output must be ``(B, classes)`` logits."""
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(
            f"{key}.model outputs {shape} for a batch, not (batch, classes) logits; make its forward return "
            "one (B, num_classes) tensor (e.g. flatten or pool before the head)"
        )


#: The type of every top-level option of kd-distill, kd-train and kd-llm-distill (conf/distill.yaml,
#: conf/train.yaml, conf/llm_distill.yaml; a tool checks those its config has). ``cpu_threads`` is checked by
#: engine.threads (an int or ``auto``), ``ckpt_path`` by the resume logic (a path, ``last`` or ``auto``).
RUN_OPTIONS: dict[str, tuple[type, ...]] = {
    "task_name": (str,),
    "seed": (int,),
    "cpu_threads": (int, str),
    "optimized_metric": (str,),
    "ckpt_path": (str, type(None)),
    "compare_scratch": (bool,),
    "save_teacher": (bool,),
    "scale_lr_with_world_size": (bool,),
    "allow_other_teacher": (bool,),
}


def check_run_options(cfg: DictConfig) -> None:
    """Top-level options of a run (:data:`RUN_OPTIONS`): types a typo or a shell quirk would silently coerce."""
    for key, types in RUN_OPTIONS.items():
        if key in cfg:
            check_type(cfg[key], types, key)


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def process_count(devices: Any) -> int | None:
    """How many processes ``trainer.devices`` asks for, whatever its spelling (``4``, ``'4'``, ``[0, 1]``,
    ``'0,1'``); None for ``auto`` / ``-1`` (Lightning picks) or a value it would refuse itself."""
    if isinstance(devices, bool):
        return None
    if isinstance(devices, str):
        text = devices.strip()
        if text.lstrip("-").isdigit():
            devices = int(text)
        elif "," in text:
            return len([part for part in text.split(",") if part.strip()])
        else:
            return None
    if isinstance(devices, int):
        return devices if devices > 0 else None
    if isinstance(devices, (list, tuple)) or type(devices).__name__ == "ListConfig":
        return len(devices)
    return None


def check_trainer(trainer_cfg: DictConfig, key: str = "trainer") -> None:
    """A training budget that ends, and no more CPU processes than cores."""
    max_epochs, max_steps = trainer_cfg.get("max_epochs"), trainer_cfg.get("max_steps", -1)
    for name, value in (("max_epochs", max_epochs), ("max_steps", max_steps)):
        check_type(value, (int, type(None)), f"{key}.{name}")
    if trainer_cfg.get("fast_dev_run"):
        return
    if (max_steps is None or max_steps < 1) and (max_epochs is None or max_epochs < 1):
        raise ConfigError(
            f"{key}.max_epochs={max_epochs} gives no training budget (-1 would train forever, 0 not at all); "
            f"set {key}.max_epochs >= 1 (or {key}.max_steps >= 1)"
        )
    accumulate = trainer_cfg.get("accumulate_grad_batches", 1)
    check_type(accumulate, int, f"{key}.accumulate_grad_batches")
    if accumulate < 1:
        raise ConfigError(f"{key}.accumulate_grad_batches={accumulate} must be >= 1 (batches per optimizer step)")
    limit = trainer_cfg.get("limit_train_batches")
    if isinstance(limit, (int, float)) and not isinstance(limit, bool) and limit <= 0:
        raise ConfigError(f"{key}.limit_train_batches={limit} trains on no batch; set it > 0 (1.0: every batch)")
    devices, accelerator = process_count(trainer_cfg.get("devices")), str(trainer_cfg.get("accelerator", "auto"))
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    cores = usable_cores()
    if on_cpu and devices is not None and devices > cores:
        raise ConfigError(
            f"{key}.devices={devices} starts {devices} CPU processes on {cores} cores; set {key}.devices to at "
            f"most {cores} (or run on GPUs: {key}.accelerator=gpu)"
        )


def check_factory(factory: Any, key: str) -> None:
    """An optimizer / scheduler factory (``_partial_: true``): a finite, non-negative learning rate and a
    positive schedule length, checked before any training."""
    keywords = getattr(factory, "keywords", {}) or {}
    for name in ("lr", "weight_decay", "momentum"):
        if name in keywords:
            value = keywords[name]
            check_type(value, (int, float), f"{key}.{name}")
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"{key}.{name}={value} must be a finite number >= 0")
    for name in ("T_max", "step_size", "total_iters", "T_0"):
        if name in keywords:
            check_type(keywords[name], int, f"{key}.{name}")
            if keywords[name] < 1:
                raise ConfigError(f"{key}.{name}={keywords[name]} must be >= 1 (a schedule of at least one step)")


def check_monitored(metrics: set[str], trainer_callbacks: list[Any], optimized_metric: str) -> None:
    """``optimized_metric`` and every callback's ``monitor`` must be metrics the method logs (a name ending
    in ``/*`` stands for a family, e.g. ``val/acc/*`` for one metric per peer)."""
    families = (*(name[:-1] for name in metrics if name.endswith("/*")), "schedule/")

    def known(name: str) -> bool:
        return name in metrics or name.startswith(families)

    if not known(optimized_metric):
        raise ConfigError(
            f"optimized_metric={optimized_metric} is never logged by this method; use one of {sorted(metrics)}"
        )
    for callback in trainer_callbacks:
        monitor = getattr(callback, "monitor", None)
        if isinstance(monitor, str) and not known(monitor):
            name = type(callback).__name__
            raise ConfigError(
                f"the {name} callback monitors {monitor}, which this method never logs; set its monitor to one "
                f"of {sorted(metrics)}"
            )


def checked_factory(node: DictConfig, key: str) -> Any:
    """An optimizer / scheduler factory built from ``node`` and checked (:func:`check_factory`)."""
    factory = build(node, key)
    check_factory(factory, key)
    return factory


def check_fit(fit_cfg: DictConfig, key: str) -> None:
    """A supervised fit recipe (``teacher.fit``): its budget, optimizer and scheduler, before it runs."""
    check_trainer(DictConfig({"max_epochs": fit_cfg.get("max_epochs")}), key)
    for name in ("optimizer", "scheduler"):
        if fit_cfg.get(name):
            checked_factory(fit_cfg[name], f"{key}.{name}")


def check_constructor_options(factory: Callable[..., Any], key: str, offered: Collection[str]) -> None:
    """Every keyword of the ``_partial_`` constructor ``factory`` (``<key>.<option>`` in the config) is an
    argument of its class: a misspelt option is one line naming it and the nearest ones, before anything is
    built, not a failed call once the teachers are trained. ``offered``: the arguments the recipe passes
    itself (left out of the options listed)."""
    accepted = constructor_arguments(factory.func)  # type: ignore[attr-defined]
    if accepted is None:
        return
    unknown = sorted(str(name) for name in factory.keywords if name not in accepted)  # type: ignore[attr-defined]
    if not unknown:
        return
    options = sorted(accepted - set(offered))
    near = difflib.get_close_matches(unknown[0], options, n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(f'{key}.{name}' for name in near)}? " if near else ""
    raise ConfigError(
        f"{key}.{unknown[0]} is not an option of {factory.func.__name__}; {hint}its options: {options} "  # type: ignore[attr-defined]
        f"(remove it: ~{key}.{unknown[0]})"
    )


def constructor_arguments(cls: type) -> set[str] | None:
    """The keyword arguments ``cls(...)`` takes: its ``__init__``'s named parameters and, while an ``__init__``
    passes ``**kwargs`` on, those of the next class along the method resolution order that defines one; None
    when every ``__init__`` of the chain takes ``**kwargs`` (any keyword)."""
    names: set[str] = set()
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    for klass in cls.__mro__:
        if "__init__" not in vars(klass) or klass is object:
            continue
        parameters = inspect.signature(klass.__init__).parameters
        names |= {name for name, p in list(parameters.items())[1:] if p.kind in named}
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            return names
    return None
