"""On-policy distillation (``llm/method=on_policy``): GKD's student-sampled batches."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from kd_lightning.engine.errors import ConfigError, check_type
from kd_lightning.llm.protocol import ANY_SOURCE, SOURCE_KEY, SUPERVISED_SOURCES, TokenLoss, TokenSource
from kd_lightning.llm.tokens import IGNORE_INDEX
from kd_lightning.methods.lm.base import Batch, LMMethod

#: What ``generate()`` samples with unless ``llm.method.generation`` says otherwise.
DEFAULT_GENERATION = {"max_new_tokens": 64, "temperature": 1.0, "top_k": 0, "top_p": 1.0}


def sampled_batch(
    prompt_ids: Tensor, prompt_mask: Tensor, sequences: Tensor, eos_ids: Tensor, pad_id: int
) -> dict[str, Any]:
    """A training batch from ``generate`` output: prompt (left-padded) + sampled tokens up to and including
    the first EOS; only sampled tokens are labelled, everything after the EOS is padding. Its
    ``token_source`` is the student: no loss term may treat them as ground truth."""
    sampled = sequences[:, prompt_ids.shape[1] :]
    is_eos = torch.isin(sampled, eos_ids).long()
    kept = (is_eos.cumsum(dim=1) - is_eos) == 0  # up to and including the first EOS
    sampled = torch.where(kept, sampled, torch.full_like(sampled, pad_id))
    return {
        "input_ids": torch.cat([prompt_ids, sampled], dim=1),
        "attention_mask": torch.cat([prompt_mask, kept.long()], dim=1),
        "labels": torch.cat([torch.full_like(prompt_ids, IGNORE_INDEX), sampled.masked_fill(~kept, IGNORE_INDEX)], 1),
        SOURCE_KEY: TokenSource.STUDENT.value,
    }


class OnPolicy(LMMethod):
    r"""On-policy distillation, GKD (Agarwal et al. 2024, "On-Policy Distillation of Language Models").

    With probability ``lmbda`` per batch (the same on every rank) the student samples completions of the
    batch's prompts (``generate``, no gradient, seeded by ``seed``, epoch, batch and rank); the teacher
    scores the sampled tokens and the student is trained on

    .. math:: L = \frac{1}{N}\sum_{i \in y \sim p_s} \alpha\, T^2 D\big(p_t^i \,\|\, p_s^i\big)

    (no cross-entropy: the tokens are the student's own, :mod:`kd_lightning.llm.protocol`); the other
    batches are dataset batches, as :class:`~kd_lightning.methods.lm.TokenKD`. ``lmbda = 1`` needs
    prompts only (``llm/data=prompts``). GKD pairs it with the generalised JSD (``llm/loss=jsd``).
    Across tokenizers (``llm/loss=gold`` / ``uld``) the samples are decoded and encoded again for both
    tokenizers by ``aligned`` (the data's encoder), as TRL's GOLD trainer does.

    Args:
        lmbda: the fraction of on-policy batches, in (0, 1].
        generation: ``transformers`` ``generate()`` sampling arguments (``max_new_tokens``, ``temperature``,
            ``top_k``, ``top_p``).
        seed: the sampling seed.
        pad_token_id: the student tokenizer's padding id.
        eos_token_id: the student tokenizer's end-of-sequence id(s).
        aligned: the data's aligned encoder (cross-tokenizer losses).
    """

    scheme = "on_policy"

    takes_logit_cache = False
    token_sources = ANY_SOURCE  # its samples; dataset batches too when lmbda < 1
    lmbda_range = (0.0, 1.0, False)  # (low, high, low included)

    def __init__(
        self,
        *args: Any,
        lmbda: float = 1.0,
        generation: Mapping[str, Any] | None = None,
        seed: int = 0,
        pad_token_id: int | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        aligned: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        type(self).check_options({"lmbda": lmbda, "generation": generation})
        self.lmbda = float(lmbda)
        self.generation = {**DEFAULT_GENERATION, **(generation or {})}
        config = getattr(self.student, "generation_config", None)
        eos = eos_token_id if eos_token_id is not None else getattr(config, "eos_token_id", None)
        self.eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        self.pad_token_id = pad_token_id if pad_token_id is not None else getattr(config, "pad_token_id", None)
        if self.lmbda > 0 and (not self.eos_ids or self.pad_token_id is None):
            raise ConfigError("on-policy sampling needs pad and eos token ids (llm.student.tokenizer or the teacher's)")
        if self.lmbda > 0 and self.loss.cross_tokenizer and aligned is None:
            raise ConfigError("on-policy cross-tokenizer distillation needs the data's AlignedEncoder (aligned=...)")
        self.seed = seed
        self.aligned = aligned
        self.check_sampling_loss()

    def check_sampling_loss(self) -> None:
        """A loss that reads the student's samples only needs every batch sampled (``lmbda = 1``); one whose
        estimator assumes exact samples (``exact_samples``) needs them drawn from the student's own
        distribution at its temperature, untruncated."""
        name = f"llm/method={self.config_name()}"
        if self.lmbda < 1 and not any(SUPERVISED_SOURCES & sources for sources in self.loss.reads.values()):
            raise ConfigError(
                f"llm/loss ({type(self.loss).__name__}) reads the student's samples only but {name} with "
                f"llm.method.lmbda={self.lmbda} also trains on dataset batches: set llm.method.lmbda=1"
            )
        if getattr(self.loss, "exact_samples", False) and self.lmbda > 0:
            gen = self.generation
            if gen["temperature"] != self.loss.temperature or gen.get("top_k") or gen.get("top_p", 1.0) != 1.0:
                raise ConfigError(
                    f"llm/loss ({type(self.loss).__name__}) estimates the gradient from exact samples of the student "
                    f"at T={self.loss.temperature}, but {name} samples with llm.method.generation temperature="
                    f"{gen['temperature']} top_k={gen.get('top_k')} top_p={gen.get('top_p')}: set "
                    f"temperature={self.loss.temperature}, top_k=0, top_p=1"
                )

    @classmethod
    def check_config(cls, loss: TokenLoss | None, teachers: Sequence[str], cached: bool, remote: bool) -> None:
        super().check_config(loss, teachers, cached, remote)
        if loss is not None and not any(TokenSource.STUDENT in loss.reads[term] for term in loss.reads):
            raise ConfigError(
                f"llm/method={cls.config_name()} trains on the student's own samples, which no term of llm.loss "
                "may read; pick a divergence loss (llm/loss=jsd, reverse_kl, forward_kl, ...)"
            )

    @classmethod
    def check_options(cls, options: Mapping[str, Any], models: Mapping[str, nn.Module] | None = None) -> None:
        lmbda, (low, high, low_ok) = options.get("lmbda", 1.0), cls.lmbda_range
        check_type(lmbda, (int, float), "llm.method.lmbda")
        if not (low <= lmbda <= high) or (lmbda == low and not low_ok):
            fix = "; lmbda = 0 is off-policy: llm/method=token_kd" if lmbda == 0 else ""
            interval = f"{'[' if low_ok else '('}{low}, {high}]"
            raise ConfigError(
                f"llm.method.lmbda={lmbda} must be in {interval} (the fraction of on-policy batches){fix}"
            )
        generation = options.get("generation") or {}
        unknown = sorted(set(generation) - {*DEFAULT_GENERATION, "repetition_penalty", "min_new_tokens"})
        if unknown:
            raise ConfigError(f"llm.method.generation has unknown keys {unknown}; use {sorted(DEFAULT_GENERATION)}")
        if "max_new_tokens" in generation:
            check_type(generation["max_new_tokens"], int, "llm.method.generation.max_new_tokens")
            if generation["max_new_tokens"] < 1:
                raise ConfigError("llm.method.generation.max_new_tokens must be >= 1")

    # ----------------------------------------------------------------------------------- sampling
    def _rng(self, batch_idx: int, *extra: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.current_epoch, batch_idx, *extra])

    def on_policy(self, batch_idx: int) -> bool:
        """Whether this batch is sampled from the student: probability ``lmbda``, the same on every rank."""
        return self.lmbda > 0 and self._rng(batch_idx).random() < self.lmbda

    def training_batch(self, batch: Batch, batch_idx: int) -> Batch:
        if self.on_policy(batch_idx):
            return self.sample(batch, batch_idx)
        if "input_ids" not in batch:
            raise ConfigError(
                f"training batches hold prompts only but llm.method.lmbda={self.lmbda} < 1 also trains on dataset "
                "completions; set llm.data.prompt_only=false"
            )
        return batch

    @torch.no_grad()
    def sample(self, batch: Batch, batch_idx: int) -> dict[str, Any]:
        """Completions of the batch's prompts sampled from the student (eval mode, no gradient, seeded; token
        ids of a head padded beyond the shared vocabulary are never sampled)."""
        if "prompt_input_ids" not in batch:
            raise ConfigError("on-policy training needs prompts in the batches (prompt_input_ids); check llm.data")
        prompt_ids, prompt_mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
        seed = int(self._rng(batch_idx, self.global_rank, 1).integers(2**31))
        rows = self.student.get_output_embeddings().weight.shape[0]
        vocab = len(self.aligned.student.tokenizer) if self.aligned else self.sampling_vocab(rows)
        padding = list(range(vocab, rows))  # head rows beyond the tokenizer
        was_training = self.student.training
        self.student.eval()
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, device_type=self.device.type):
            torch.manual_seed(seed)
            sequences = self.student.generate(
                input_ids=prompt_ids,
                attention_mask=prompt_mask,
                do_sample=True,
                pad_token_id=self.pad_token_id,
                eos_token_id=self.eos_ids,
                suppress_tokens=padding or None,
                **self.generation,
            )
        self.student.train(was_training)
        eos_ids = torch.as_tensor(self.eos_ids, device=sequences.device)
        sampled = sampled_batch(prompt_ids, prompt_mask, sequences, eos_ids, self.pad_token_id)
        if "teacher_index" in batch:  # rows keep their teachers
            sampled["teacher_index"] = batch["teacher_index"]
        if self.aligned is None or not self.loss.cross_tokenizer:
            return sampled
        return self.realign(batch["prompt_text"], sampled, prompt_ids.shape[1])

    def sampling_vocab(self, rows: int) -> int:
        """The token ids the student may sample: the loss's shared vocabulary."""
        return self.loss.shared_vocab(rows, None)

    def realign(self, prompts: list[str], sampled: Batch, prompt_width: int) -> dict[str, Any]:
        """The student's samples as text, encoded again for both tokenizers and aligned (cross-tokenizer
        on-policy, as GOLD does): a sample that ended without EOS gets none."""
        tokenizer = self.aligned.student.tokenizer
        labels = sampled["labels"][:, prompt_width:]
        routes = sampled["teacher_index"].tolist() if "teacher_index" in sampled else [None] * len(prompts)
        examples = []
        for prompt, row, route in zip(prompts, labels, routes, strict=True):
            tokens = row[row != IGNORE_INDEX].tolist()
            finished = bool(tokens) and tokens[-1] in self.eos_ids
            text = tokenizer.decode(tokens[:-1] if finished else tokens, skip_special_tokens=True)
            examples.append(
                self.aligned.encode(prompt, text, eos=finished, **({} if route is None else {"teacher": route}))
            )
        batch = self.aligned.collate(examples)
        moved = {key: value.to(self.device) if isinstance(value, Tensor) else value for key, value in batch.items()}
        return {**moved, SOURCE_KEY: TokenSource.STUDENT.value}
