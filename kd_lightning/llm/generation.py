"""Black-box sequence-level KD data: teacher completions of generated prompts, written to JSONL.

Sequence-level KD (Kim & Rush 2016) trains the student with plain cross-entropy on the teacher's
outputs; it needs only the teacher's text, not its logits. With ``filter_correct`` the completions of
problems with a checkable answer are kept only when the answer is right (rejection sampling, as in
DeepSeek-R1's SFT data); sample several per prompt (``num_samples``, ``do_sample``) to keep more.

The JSONL file is resumable: prompts already in it are skipped, every batch is appended as soon as it
is generated, and a sidecar ``<file>.meta.json`` records the generation settings and the model so a
resumed run cannot silently mix different ones. Console entry: ``kd-llm-generate`` (config ``conf/llm_generate.yaml``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kd_lightning.engine.caching.store import write_text_atomic
from kd_lightning.engine.errors import ConfigError, check_type
from kd_lightning.engine.instantiate import build
from kd_lightning.engine.threads import set_cpu_threads
from kd_lightning.llm.prompts import Prompt, chat_ids, is_correct, make_prompts
from kd_lightning.llm.records import RELAX_ADVICE, GenerationReport, read_records, score_file

if TYPE_CHECKING:
    from kd_lightning.llm.remote import RemoteTeacher

log = logging.getLogger(__name__)


#: The type each generation setting must have (a bool is never a number, a string never a bool).
_SETTING_TYPES: dict[str, Any] = {
    "max_new_tokens": int,
    "do_sample": bool,
    "temperature": (int, float),
    "top_p": (int, float),
    "num_samples": int,
    "seed": int,
    "system_prompt": (str, type(None)),
}


def checked_settings(values: Mapping[str, Any], key: str) -> GenerationSettings:
    """:class:`GenerationSettings` from ``values`` (the config node ``key``), each value's type checked first."""
    unknown = sorted(set(values) - set(_SETTING_TYPES))
    if unknown:
        raise ConfigError(f"{key} has unknown settings {unknown}; use {sorted(_SETTING_TYPES)}")
    for name, value in values.items():
        check_type(value, _SETTING_TYPES[name], f"{key}.{name}")
    return GenerationSettings(**values)


@dataclass(frozen=True)
class GenerationSettings:
    """Everything besides the prompts that decides a completion; stored beside the JSONL file."""

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    num_samples: int = 1
    seed: int = 0
    system_prompt: str | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"generate.max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.num_samples < 1:
            raise ConfigError(f"generate.num_samples={self.num_samples} must be >= 1")
        if self.num_samples > 1 and not self.do_sample:
            raise ConfigError(
                f"generate.num_samples={self.num_samples} with greedy decoding repeats one completion; "
                "set generate.do_sample=true"
            )
        if self.do_sample and (self.temperature <= 0 or not 0 < self.top_p <= 1):
            raise ConfigError(
                f"generate.temperature={self.temperature} must be > 0 and generate.top_p={self.top_p} in (0, 1]"
            )


def model_identity(model: PreTrainedModel | RemoteTeacher) -> str:
    """A cheap fingerprint of a model: its class, source and parameter count (a remote teacher: its server
    and model name)."""
    if not isinstance(model, torch.nn.Module):
        return model.identity
    count = sum(parameter.numel() for parameter in model.parameters())
    return f"{type(model).__name__}:{model.config.name_or_path}:{count}"


def _check_settings(path: Path, settings: GenerationSettings, model: PreTrainedModel, key: str) -> None:
    """Write the settings (and the model's identity) beside a new file; refuse to extend a file made with
    other settings or by another model (a remote teacher: another server or model name), or a non-empty file
    without its settings (made elsewhere, or its sidecar lost or damaged)."""
    meta = path.with_name(path.name + ".meta.json")
    wanted = {**asdict(settings), "model": model_identity(model)}
    fix = f"use a new {key}, or delete {path} and {meta.name} to start it again"
    if path.is_file() and path.read_bytes().strip():
        try:
            stored = json.loads(meta.read_text()) if meta.exists() else None
        except (ValueError, OSError):  # not JSON or not UTF-8
            stored = "damaged"
        if not isinstance(stored, dict):
            what = "has no settings file" if stored is None else "has a damaged settings file"
            raise ConfigError(f"{key}={path} {what} {meta.name}, so it cannot be extended safely: {fix}")
        if stored.get("model") != wanted["model"]:
            raise ConfigError(
                f"{key}={path} was generated by another teacher ({stored.get('model')!r}, not {wanted['model']!r}): "
                f"{fix}, or use that teacher"
            )
        changed = {name: (stored.get(name), value) for name, value in wanted.items() if stored.get(name) != value}
        if changed:
            raise ConfigError(
                f"{key}={path} was generated with other settings {changed} (stored, requested); "
                f"use a new {key} or the stored settings"
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(meta, json.dumps(wanted, indent=1))


def _batch_seed(seed: int, prompts: Sequence[Prompt]) -> int:
    """A sampling seed fixed by the run seed and the batch's prompts, so a resumed run samples the same."""
    digest = hashlib.sha1(f"{seed}:{','.join(p.id for p in prompts)}".encode()).hexdigest()
    return int(digest[:8], 16)


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of shape ``(B, max_len)``, padded on the left (for generation)."""
    width = max(len(sequence) for sequence in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        if sequence:
            ids[row, width - len(sequence) :] = torch.as_tensor(sequence)
            mask[row, width - len(sequence) :] = 1
    return ids, mask


@torch.no_grad()
def complete(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    settings: GenerationSettings,
) -> list[list[str]]:
    """``settings.num_samples`` completions per prompt (chat template, left padding), special tokens removed;
    a remote teacher is asked through its chat API."""
    if not isinstance(model, torch.nn.Module):
        return model.complete(prompts, settings)
    ids, mask = left_pad([chat_ids(tokenizer, p.text, settings.system_prompt) for p in prompts], tokenizer.pad_token_id)
    device = next(model.parameters()).device
    sampling = {"temperature": settings.temperature, "top_p": settings.top_p} if settings.do_sample else {}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(_batch_seed(settings.seed, prompts))
        output = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=settings.max_new_tokens,
            do_sample=settings.do_sample,
            num_return_sequences=settings.num_samples,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **sampling,
        )
    texts = tokenizer.batch_decode(output[:, ids.shape[1] :], skip_special_tokens=True)
    k = settings.num_samples
    return [[text.strip() for text in texts[i * k : (i + 1) * k]] for i in range(len(prompts))]


def generate_file(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    out_file: str | Path,
    settings: GenerationSettings,
    batch_size: int = 16,
    filter_correct: bool = False,
    progress: bool = True,
) -> GenerationReport:
    """Append the completions of every prompt not yet in ``out_file``; one record per completion:
    ``{"id", "prompt", "kind", "answer", "sample", "completion", "correct"}`` (``correct`` is None
    without an answer). With ``filter_correct``, fail when no completion of an answerable prompt is right.
    """
    if batch_size < 1:
        raise ConfigError(f"generate.batch_size={batch_size} must be >= 1")
    path = Path(out_file).expanduser()
    _check_settings(path, settings, model, "generate.out_file")
    done = {record["id"] for record in read_records(path, "generate.out_file", repair=True)}
    todo = [prompt for prompt in prompts if prompt.id not in done]
    if todo:
        log.info("generating %d of %d prompts into %s", len(todo), len(prompts), path)
    if isinstance(model, torch.nn.Module):
        model.eval()
    with path.open("a") as sink, tqdm(total=len(todo), desc="teacher completions", disable=not progress) as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            for prompt, samples in zip(batch, complete(model, tokenizer, batch, settings), strict=True):
                for index, text in enumerate(samples):
                    correct = None if prompt.answer is None else is_correct(text, prompt.answer)
                    record = {"id": prompt.id, "prompt": prompt.text, "kind": prompt.kind, "answer": prompt.answer}
                    record.update(sample=index, completion=text, correct=correct)
                    sink.write(json.dumps(record) + "\n")
            sink.flush()
            bar.update(len(batch))
    wanted = {prompt.id for prompt in prompts}
    report = score_file(path, wanted, generated=len(todo))
    if filter_correct and report.checkable and not report.correct:
        raise ConfigError(
            f"generate.filter_correct=true kept none of {report.checkable} completions in {path}: "
            f"{RELAX_ADVICE}generate.filter_correct=false"
        )
    return report


def run(cfg: DictConfig) -> GenerationReport:
    """``kd-llm-generate``: build the teacher and its tokenizer, make the prompts, generate into the file."""
    check_type(cfg.seed, int, "seed")
    check_type(cfg.generate.batch_size, int, "generate.batch_size")
    check_type(cfg.generate.filter_correct, bool, "generate.filter_correct")
    settings = checked_settings({f.name: cfg.generate[f.name] for f in fields(GenerationSettings)}, "generate")
    torch.manual_seed(cfg.seed)
    prompts = make_prompts(**cfg.prompts)
    model = build(cfg.llm.teacher.model, "llm.teacher.model")
    set_cpu_threads(cfg.cpu_threads, [model], "cpu_threads")
    tokenizer = build(cfg.llm.teacher.tokenizer, "llm.teacher.tokenizer")
    report = generate_file(
        model,
        tokenizer,
        prompts,
        cfg.generate.out_file,
        settings,
        batch_size=cfg.generate.batch_size,
        filter_correct=cfg.generate.filter_correct,
    )
    rate = ""
    if report.pass_rate is not None:
        rate = f", verifier pass rate {report.pass_rate:.1%} ({report.strict_pass_rate:.1%} with the answer line, "
        rate += f"which {report.answered_rate:.1%} have)"
    log.info("%s: %d completions of %d prompts%s", report.path, report.completions, report.prompts, rate)
    return report
