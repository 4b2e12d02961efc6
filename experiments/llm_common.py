"""What the LM studies' scripts (llm_demo, llm_objectives, llm_cross_tokenizer, llm_reasoning, llm_frontier) share:
the kd-llm-distill config they compose runs from, the scheme that config names, the CPU trainer and optimiser they
train with, validation, the verifier's pass rate, where finished runs are kept and the key a finished run is found
under."""

from __future__ import annotations

import argparse
import functools
import hashlib
import importlib.metadata
import json
import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from kd_lightning.cli.common import CONFIG_DIR
from kd_lightning.engine.instantiate import build
from kd_lightning.llm.generation import GenerationSettings, generate_file
from kd_lightning.llm.records import score_file
from kd_lightning.methods.lm.base import LMMethod
from kd_lightning.recipes.llm_components import offer, scheme_factory

# The tables' mean ± std: scripts/multirun.py's, which the repository's other result scripts share (imported from
# there, not copied); the studies import it from here.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from multirun import mean_std

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "results" / "llm.md"
RESULTS_TITLE = "# LM distillation results"


def llm_config(overrides: Iterable[str]) -> DictConfig:
    """The kd-llm-distill config with ``overrides``, as the command line would compose it."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="llm_distill", overrides=list(overrides))


def scheme_from_config(cfg: DictConfig, vocab_size: int | None = None, **ingredients: Any) -> LMMethod:
    """The scheme of a composed ``kd-llm-distill`` config (``llm.method`` and its objective) around the given
    ingredients (student, teacher, optimizer, ...), for the studies, which build models and data themselves;
    ``vocab_size``: the shared tokenizer size the loss compares. ``llm.hidden`` (``llm/hidden=mse`` / ``cosine``)
    adds its hidden-state term, as in kd-llm-distill."""
    factory, loss_cfg = scheme_factory(cfg)
    loss = build(loss_cfg, "llm.loss") if loss_cfg is not None else None
    if loss is not None and vocab_size is not None and getattr(loss, "vocab_size", 0) is None:
        loss.vocab_size = vocab_size
    hidden = build(cfg.llm.hidden, "llm.hidden") if cfg.llm.get("hidden") else None
    return offer(factory, loss=loss, vocab_size=vocab_size, hidden=hidden, **ingredients)


def adamw(lr: float) -> functools.partial:
    """The scripts' optimiser factory: AdamW at ``lr`` without weight decay."""
    return functools.partial(torch.optim.AdamW, lr=lr, weight_decay=0.0)


def cpu_trainer(steps: int) -> L.Trainer:
    """A quiet CPU trainer for ``steps`` optimiser steps (no validation, logger or checkpoints; clip 1.0)."""
    return L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        max_epochs=-1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def timed_fit(module: L.LightningModule, datamodule: L.LightningDataModule, steps: int) -> float:
    """Trains ``module`` for ``steps`` steps on ``datamodule`` with :func:`cpu_trainer`; returns the seconds it took."""
    start = time.perf_counter()
    cpu_trainer(steps).fit(module, datamodule=datamodule)
    return time.perf_counter() - start


def validate(module: L.LightningModule, datamodule: L.LightningDataModule) -> dict[str, float]:
    """The module's validation metrics on the datamodule's validation split, as floats."""
    metrics = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False).validate(
        module, datamodule=datamodule, verbose=False
    )[0]
    return {name: float(value) for name, value in metrics.items()}


def pass_rate(model: torch.nn.Module, tokenizer, prompts, out_file: Path, max_new_tokens: int) -> float:
    """Greedy verifier pass rate of ``model`` on ``prompts`` (completions kept in ``out_file``)."""
    out_file.unlink(missing_ok=True)
    settings = GenerationSettings(max_new_tokens=max_new_tokens)
    return generate_file(model, tokenizer, prompts, out_file, settings, batch_size=16, progress=False).pass_rate


def verified(paths: list[Path], spread: bool = True) -> str:
    """Table cells from held-out completions, re-verified: pass rate with the answer line (strict), pass rate
    counting the last number when there is none (flexible), and the answer-line rate; mean ± std over ``paths``
    (one per seed), or the single value of one file without ``spread``."""
    reports = [score_file(path) for path in paths]
    rates = ("strict_pass_rate", "pass_rate", "answered_rate")
    if not spread:
        return " | ".join(f"{100 * getattr(reports[0], rate):.1f}" for rate in rates)
    return " | ".join(mean_std([getattr(report, rate) for report in reports]) for rate in rates)


SOFTWARE = ("torch", "transformers", "lightning")


def software() -> dict[str, str]:
    """The versions of the packages a run's numbers depend on: the same seed and flags under other versions train
    to other weights, so every kept record carries them (see :func:`finished`, :func:`software_summary`)."""
    return {name: importlib.metadata.version(name) for name in SOFTWARE}


def finished(path: Path, make) -> dict:
    """The record of a finished run kept at ``path``: made once by ``make()``, kept with :func:`software`."""
    if not path.is_file():
        path.write_text(json.dumps({**make(), "software": software()}))
    return json.loads(path.read_text())


def software_summary(records: Iterable[dict]) -> str:
    """The table's sentence on the software its records come from; it says so when they disagree, since rows
    trained under other versions are not like-for-like (records older than the field: "not recorded")."""
    seen = sorted({json.dumps(record.get("software"), sort_keys=True) for record in records})
    versions = [json.loads(item) or {} for item in seen]
    names = [", ".join(f"{name} {kept[name]}" for name in SOFTWARE if name in kept) for kept in versions]
    names = [name or "not recorded (records older than the field)" for name in names]
    if len(names) == 1:
        return f"Software: {names[0]}."
    return f"Software: the records come from {len(names)} version sets ({'; '.join(names)}): rows may differ by it."


def kd_home() -> Path:
    """$KD_LIGHTNING_HOME (default ~/.kd_lightning): the scripts' teacher data and finished runs."""
    return Path(os.environ.get("KD_LIGHTNING_HOME", Path.home() / ".kd_lightning"))


def run_key(name: str, seed: int, args: argparse.Namespace, ignore: Iterable[str]) -> str:
    """``<name>_seed<seed>_<digest>``: the digest covers every argument but ``ignore`` (those that do not change a
    run's result), so a finished run is reused only under the settings it ran with."""
    settings = {key: value for key, value in vars(args).items() if key not in set(ignore)}
    digest = hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return f"{name}_seed{seed}_{digest}"


def study_command(script: str, stage: str) -> str:
    """A study's table's Command: how it was run (``--stage table`` noted after it, not in it)."""
    flags = " ".join(sys.argv[1:]).replace("--stage table", "").split()
    command = f"`{' '.join([f'python experiments/{script}', *flags])}`"
    note = " (this table: the same with `--stage table`, from the finished runs)"
    return command + (note if stage == "table" else "")
