"""``kd-export --format hf``: a Hugging Face student as a ``save_pretrained`` directory, tokenizer included.

- Classifier runs (kd-distill) whose student wraps a Hugging Face ``*ForSequenceClassification`` /
  ``*ForImageClassification`` model (``student=hf_text``, ``hf_image``): the wrapped model, with the data's
  tokenizer (``data.tokenizer``) for text.
- Language-model runs (kd-llm-distill): the causal-LM student (LoRA adapters merged into its weights) and its
  tokenizer.

Each directory is written to ``RUN_DIR/export/student_hf/`` and checked after writing: reloaded offline with
``transformers``' Auto classes (``local_files_only``), its logits on a held batch must equal the checkpoint's
within ``--atol`` (max absolute difference; attended tokens only for an LM), and the saved tokenizer must encode
the held text to the same ids; otherwise the directory is removed and kd-export stops with one line.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kd_lightning.engine.errors import ConfigError
from kd_lightning.engine.instantiate import build
from kd_lightning.engine.trusted import DEFAULT_TRUSTED, check_trusted
from kd_lightning.engine.weights import load_weights
from kd_lightning.models.external import HFClassifier

HF_DIR = "student_hf"


class HFExportError(ConfigError):
    """A Hugging Face export that could not be written or does not match its checkpoint; one line."""


def max_diff(expected: Tensor, got: Tensor, mask: Tensor | None = None) -> float:
    """Max absolute difference of two logit tensors (over the attended positions of ``mask`` when given)."""
    if got.shape != expected.shape:
        return float("inf")
    diff = (got.float() - expected.float()).abs()
    if mask is not None:
        diff = diff[mask.bool()]
    return float(diff.max()) if diff.numel() else 0.0


def directory_bytes(path: Path) -> int:
    """Bytes of every file under ``path``."""
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())


def checked(path: Path, diff: float, atol: float, what: str) -> float:
    """``diff`` when within ``atol``; else the directory is removed and the export stops."""
    if not diff <= atol:
        shutil.rmtree(path, ignore_errors=True)
        raise HFExportError(
            f"the save_pretrained export ({path.name}) of the {what} differs from the checkpoint by {diff:.3g} (max "
            f"abs logit difference on a held batch), above --atol {atol:g}; raise --atol"
        )
    return diff


def same_encoding(path: Path, tokenizer: Any, texts: list[str]) -> None:
    """The saved tokenizer must encode ``texts`` to the ids the run's tokenizer gives."""
    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    for text in texts:
        if reloaded(text)["input_ids"] != tokenizer(text)["input_ids"]:
            shutil.rmtree(path, ignore_errors=True)
            raise HFExportError(
                f"the tokenizer saved in {path.name} encodes {text[:40]!r} differently from the run's; it cannot be "
                "saved with save_pretrained (leave out --format hf)"
            )


def is_hf_classifier(student: nn.Module) -> bool:
    """Whether kd-export can write ``student`` with ``save_pretrained``."""
    return isinstance(student, HFClassifier) and hasattr(student.model, "save_pretrained")


@torch.inference_mode()
def export_classifier(student: nn.Module, data_cfg: Any, held: Any, out: Path, atol: float) -> dict[str, Any]:
    """Write a Hugging Face classifier student (and the text data's tokenizer) and check it on ``held`` (the first
    test batch's inputs: a mapping of tensors, or an image batch)."""
    from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification

    if not is_hf_classifier(student):
        raise HFExportError(
            f"--format hf writes Hugging Face students; this student is a {type(student).__name__} "
            "(student=hf_text or hf_image are): use --format onnx or torch-export"
        )
    path = out / HF_DIR
    shutil.rmtree(path, ignore_errors=True)
    student.model.save_pretrained(str(path), safe_serialization=True)
    tokenizer_dir = data_cfg.get("tokenizer") if data_cfg is not None else None
    if tokenizer_dir:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True).save_pretrained(str(path))
    image = "pixel_values" in student.accepted
    auto = AutoModelForImageClassification if image else AutoModelForSequenceClassification
    reloaded = auto.from_pretrained(str(path), local_files_only=True).eval()
    wrapped = HFClassifier(reloaded)
    wrapped.class_order = student.class_order  # the data's class order, as the run used it
    diff = checked(path, max_diff(student(held), wrapped(held)), atol, "student")
    return {"file": HF_DIR, "max_abs_diff": diff, "size_bytes": directory_bytes(path)}


def lm_student(run: Any, trusted: Sequence[str] = DEFAULT_TRUSTED) -> tuple[nn.Module, Any]:
    """A kd-llm-distill run's student (best checkpoint, LoRA merged) and its tokenizer, built from the run's config
    (every ``_target_`` it names in ``trusted``)."""
    from omegaconf import OmegaConf

    from kd_lightning.recipes.llm_components import build_student, build_teachers

    cfg = run.cfg
    nodes = {f"llm.{key}": cfg.llm.get(key) for key in ("student", "teacher", "data")}
    check_trusted(OmegaConf.to_container(OmegaConf.create(nodes)), str(run.run_dir / "summary.json"), trusted)
    teachers = build_teachers(cfg.llm.teacher)
    teacher, tokenizer = next(iter(teachers.models.values())), next(iter(teachers.tokenizers.values()))
    student, student_tokenizer = build_student(cfg.llm.student, teacher, tokenizer)
    if cfg.llm.get("lora"):
        from peft import LoraConfig, get_peft_model

        lora = OmegaConf.to_container(cfg.llm.lora, resolve=True)
        student = get_peft_model(student, LoraConfig(**{"task_type": "CAUSAL_LM", **lora}))
    load_weights(student, run.checkpoint, key="best checkpoint")
    if cfg.llm.get("lora"):
        student = student.merge_and_unload()
    return student.eval(), student_tokenizer


@torch.inference_mode()
def export_lm(run: Any, atol: float, trusted: Sequence[str] = DEFAULT_TRUSTED) -> dict[str, Any]:
    """Write a kd-llm-distill run's student with its tokenizer; check logits on a held validation batch and the
    tokenizer on its prompts."""
    from transformers import AutoModelForCausalLM

    student, tokenizer = lm_student(run, trusted)
    data = build(run.cfg.llm.data, "llm.data", tokenizer=tokenizer)
    data.setup()
    batch = next(iter(data.val_dataloader()))
    out = run.run_dir / "export"
    out.mkdir(exist_ok=True)
    path = out / HF_DIR
    shutil.rmtree(path, ignore_errors=True)
    student.save_pretrained(str(path), safe_serialization=True)
    tokenizer.save_pretrained(str(path))
    reloaded = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True).eval()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    expected = student(input_ids=ids, attention_mask=mask).logits
    diff = checked(path, max_diff(expected, reloaded(input_ids=ids, attention_mask=mask).logits, mask), atol, "LM")
    same_encoding(path, tokenizer, data.prompts["val"][:4])
    return {"file": HF_DIR, "max_abs_diff": diff, "size_bytes": directory_bytes(path)}
