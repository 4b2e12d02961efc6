"""LLMDistillationModule: a frozen causal-LM teacher, a trainable student and a TokenDistillationLoss."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric

from kd_lightning.engine.caching.token_outputs import LogitCache
from kd_lightning.engine.errors import ConfigError
from kd_lightning.llm.aligned import AlignedEncoder
from kd_lightning.llm.cross_token_loss import CrossTokenizerLoss
from kd_lightning.llm.multi_teacher import RoutedEncoder, TeacherCombination, add_parts, select_rows
from kd_lightning.llm.token_loss import IGNORE_INDEX, TokenDistillationLoss, TokenLossOutput, final_hidden_states
from kd_lightning.methods.base import Method, OptimizerFactory, SchedulerFactory

Batch = Mapping[str, Tensor]


@torch.no_grad()
def check_head(model: nn.Module, key: str, input_ids: Tensor, attention_mask: Tensor) -> None:
    """Fail unless ``model``'s logits are ``lm_head(last hidden state)`` (the chunked loss relies on it;
    logit soft-capping or scaling breaks it). Runs the first attended tokens of one row, in eval mode."""
    tokens = input_ids[0][attention_mask[0].bool()][:32].unsqueeze(0)
    mask = torch.ones_like(tokens)
    was_training = model.training
    model.eval()
    logits = model(input_ids=tokens, attention_mask=mask, use_cache=False).logits.float()
    recomputed = model.get_output_embeddings()(final_hidden_states(model, tokens, mask)).float()
    model.train(was_training)
    if not torch.allclose(recomputed, logits, rtol=1e-3, atol=1e-3):
        raise ConfigError(
            f"{key}: the model's logits are not lm_head(last hidden state) (logit scaling or soft-capping?); "
            "the chunked token loss cannot distil it"
        )


def sampled_batch(
    prompt_ids: Tensor, prompt_mask: Tensor, sequences: Tensor, eos_ids: Tensor, pad_id: int
) -> dict[str, Tensor]:
    """A training batch from ``generate`` output: prompt (left-padded) + sampled tokens up to and including
    the first EOS; only sampled tokens are labelled, everything after the EOS is padding."""
    sampled = sequences[:, prompt_ids.shape[1] :]
    is_eos = torch.isin(sampled, eos_ids).long()
    kept = (is_eos.cumsum(dim=1) - is_eos) == 0  # up to and including the first EOS
    sampled = torch.where(kept, sampled, torch.full_like(sampled, pad_id))
    return {
        "input_ids": torch.cat([prompt_ids, sampled], dim=1),
        "attention_mask": torch.cat([prompt_mask, kept.long()], dim=1),
        "labels": torch.cat([torch.full_like(prompt_ids, IGNORE_INDEX), sampled.masked_fill(~kept, IGNORE_INDEX)], 1),
    }


def check_setup(
    loss: nn.Module,
    lmbda: float,
    teacher: nn.Module | None,
    teachers: Mapping[str, nn.Module] | None,
    combination: TeacherCombination | None,
    logit_cache: LogitCache | None,
    aligned: AlignedEncoder | RoutedEncoder | None,
) -> None:
    """Refuse combinations of loss, mode and teachers that cannot train, naming the keys to change."""
    if not 0.0 <= lmbda <= 1.0:  # also checked by the mode (conf/llm/mode) for command-line runs
        raise ConfigError(f"llm.mode.lmbda={lmbda} must be in [0, 1] (the fraction of on-policy batches)")
    if lmbda > 0 and not loss.needs_teacher:
        raise ConfigError(
            f"llm.mode.lmbda={lmbda} samples from the student for the teacher to score: set llm.loss.alpha > 0"
        )
    if logit_cache is not None and lmbda > 0:
        raise ConfigError(
            "llm/mode=teacher_cache holds teacher outputs for dataset sequences only; on-policy samples "
            "need the live teacher (llm/mode=on_policy)"
        )
    if getattr(loss, "sides", None) and (lmbda > 0 or logit_cache is not None or teachers):
        raise ConfigError(
            "llm/loss=distillm2 trains on the teacher's and the student's cached responses with the live teacher: "
            "use llm/mode=off_policy and one teacher"
        )
    if logit_cache is not None and loss.cross_tokenizer:
        raise ConfigError(
            "llm/mode=teacher_cache stores the teacher's top-k over its own vocabulary at the student's token "
            "positions; with different tokenizers (llm/loss=uld or gold) run the teacher live (llm/mode=off_policy)"
        )
    if loss.cross_tokenizer and lmbda > 0 and aligned is None:
        raise ConfigError("on-policy cross-tokenizer distillation needs the data's AlignedEncoder (aligned=...)")
    if teachers and (teacher is not None or logit_cache is not None or combination is None):
        raise ConfigError(
            "several teachers (llm.teacher.teachers) need llm.teacher.combine and run live: no single teacher, "
            "no logit cache (llm/mode=off_policy or on_policy)"
        )
    if loss.needs_teacher and teacher is None and logit_cache is None and not teachers:
        raise ConfigError("llm.loss.alpha > 0 needs a teacher or a logit cache; set llm.loss.alpha=0 for SFT")


class LLMDistillationModule(Method):
    """Distils a Hugging Face causal-LM ``teacher`` into ``student`` token by token.

    - Teacher: frozen (``eval()``, ``requires_grad_(False)``), run under ``no_grad``, kept in eval mode,
      never in the optimizer, left out of checkpoints unless ``save_teacher`` (put back from memory on load).
    - Student: fully fine-tuned, or LoRA adapters only when ``lora`` (``peft.LoraConfig`` arguments) is given.
    - Modes: off-policy (dataset sequences); on-policy with probability ``lmbda`` per batch (GKD, Agarwal
      et al. 2024): the student samples completions of the batch's prompts (``generate``, no gradient,
      seeded by ``seed``, epoch, batch and rank), only the sampled tokens are trained on and the teacher
      scores them token by token; ``logit_cache``: teacher top-k log-probabilities read from a
      :class:`~kd_lightning.engine.caching.token_outputs.LogitCache` instead of running the teacher; ``loss.alpha = 0``:
      supervised fine-tuning, the teacher never runs (black-box sequence KD on teacher-written data).
    - Teachers: one (``teacher``), or several (``teachers`` by name, ``combination``: per-row routing or a
      per-token mixture, :mod:`kd_lightning.llm.multi_teacher`; ``losses``: one loss per teacher).
    - Tokenizers: a cross-tokenizer loss (:class:`~kd_lightning.llm.cross_token_loss.CrossTokenizerLoss`)
      reads the teacher's own tokens from the batch (``teacher_*`` keys); on-policy samples are decoded and
      re-encoded for both tokenizers by ``aligned`` (the data's encoder).
    - A loss with ``sides`` (:class:`~kd_lightning.llm.contrastive.DistiLLM2Loss`) runs each side on its own
      sequences of the batch (the teacher's responses, the student's ``sampled_*`` responses).
    - Normalisation: the loss returns sums over valid tokens; gradients are divided by the number of valid
      tokens of the whole accumulated batch (all micro-batches of an optimizer step, all ranks) in
      ``on_before_optimizer_step``, before clipping, so every token weighs the same whatever the padding,
      the accumulation or the world size.

    Logged: ``train/loss``, ``train/loss_ce``, ``train/loss_distill`` (per token; ``train/loss_distill/<part>``
    per teacher or side, summing to it), ``val/loss``, ``val/ppl`` (student perplexity on the validation
    completions), ``val/kl_to_teacher`` (forward KL at T = 1 per token; over the ``k + 1`` buckets at the
    cache's temperature in cache mode; not across tokenizers) and ``val/kl_to_teacher/<name>`` per teacher.
    """

    def __init__(
        self,
        student: nn.Module,
        loss: TokenDistillationLoss | CrossTokenizerLoss,
        optimizer: OptimizerFactory,
        teacher: nn.Module | None = None,
        scheduler: SchedulerFactory | None = None,
        lmbda: float = 0.0,
        generation: Mapping[str, Any] | None = None,
        logit_cache: LogitCache | None = None,
        lora: Mapping[str, Any] | None = None,
        pad_token_id: int | None = None,
        eos_token_id: int | list[int] | None = None,
        seed: int = 0,
        save_teacher: bool = False,
        aligned: AlignedEncoder | RoutedEncoder | None = None,
        teachers: Mapping[str, nn.Module] | None = None,
        combination: TeacherCombination | None = None,
        losses: Mapping[str, TokenDistillationLoss | CrossTokenizerLoss] | None = None,
    ) -> None:
        super().__init__(optimizer, scheduler, save_teacher=save_teacher)
        check_setup(loss, lmbda, teacher, teachers, combination, logit_cache, aligned)
        if logit_cache is not None:
            self._check_cache(logit_cache, loss, student)
        if lora:
            from peft import LoraConfig, get_peft_model

            student = get_peft_model(student, LoraConfig(**{"task_type": "CAUSAL_LM", **lora}))
        self.student = student
        if teacher is not None:
            self.add_frozen("teacher", teacher)
        else:
            self.teacher = None
        self.teachers: dict[str, nn.Module] = {}
        for name, model in (teachers or {}).items():
            if not name.isidentifier():
                raise ConfigError(f"llm.teacher.teachers: {name!r} is not a valid teacher name (letters, digits, _)")
            self.teachers[name] = self.add_frozen(f"teacher_{name}", model)
        self.combination = combination
        if combination is not None:
            combination.bind(list(self.teachers))
        self.loss = loss
        self.losses = nn.ModuleDict(dict(losses) if losses else dict.fromkeys(self.teachers, loss))
        self.lmbda = float(lmbda)
        self.generation = {"max_new_tokens": 64, "temperature": 1.0, "top_k": 0, "top_p": 1.0, **(generation or {})}
        self.logit_cache = logit_cache
        config = getattr(student, "generation_config", None)
        eos = eos_token_id if eos_token_id is not None else getattr(config, "eos_token_id", None)
        self.eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        self.pad_token_id = pad_token_id if pad_token_id is not None else getattr(config, "pad_token_id", None)
        if lmbda > 0 and (not self.eos_ids or self.pad_token_id is None):
            raise ConfigError("on-policy sampling needs pad and eos token ids (from the tokenizer)")
        self.seed = seed
        self.aligned = aligned
        self.heads_checked: set[str] = set()
        self.window_tokens = torch.zeros((), dtype=torch.long)
        self.val_loss, self.val_ce, self.val_kl = MeanMetric(), MeanMetric(), MeanMetric()
        self.val_teacher_kl = nn.ModuleDict({name: MeanMetric() for name in self.teachers})

    @staticmethod
    def _check_cache(cache: LogitCache, loss: TokenDistillationLoss, student: nn.Module) -> None:
        if cache.temperature != loss.temperature:
            raise ConfigError(
                f"the logit cache holds teacher log-probs at T={cache.temperature} but "
                f"llm.loss.divergence.temperature={loss.temperature}; rebuild the cache at the loss temperature"
            )
        vocab = loss.shared_vocab(student.get_output_embeddings().weight.shape[0], None)
        if cache.vocab_size != vocab:
            raise ConfigError(
                f"the logit cache covers {cache.vocab_size} tokens but the loss compares {vocab}; "
                "set llm.loss.vocab_size to the tokenizer size and rebuild the cache"
            )

    # ----------------------------------------------------------------------------- forward passes
    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Student logits (full vocabulary: for inspection, not for the loss)."""
        return self.student(input_ids=input_ids, attention_mask=attention_mask).logits

    def token_loss(self, batch: Batch, monitor_kl: bool = False) -> TokenLossOutput:
        """Loss sums on ``batch``; the teacher (or the cache) runs only when needed. Several teachers: their
        combination; a loss with ``sides`` (DistiLLM-2): each side on its own sequences (validation batches
        hold the teacher's responses only)."""
        sides = getattr(self.loss, "sides", None)
        if sides is None:
            return self.one_loss(self.loss, batch, monitor_kl)
        outputs = []
        for name, prefix, loss, weight in sides:
            if f"{prefix}input_ids" not in batch:
                if self.training:
                    raise ConfigError(
                        f"llm/loss=distillm2 needs {prefix}* keys in training batches (the student's responses)"
                    )
                continue
            view = (
                {key[len(prefix) :]: value for key, value in batch.items() if key.startswith(prefix)}
                if prefix
                else batch
            )
            outputs.append((name, weight, self.one_loss(loss, view, monitor_kl and not prefix)))
        parts: dict[str, Tensor] = {}
        for name, _, out in outputs:
            add_parts(parts, out.parts)
            parts[f"distill/{name}"] = out.parts["distill"]
        total = sum(weight * out.total for _, weight, out in outputs)
        return TokenLossOutput(total=total, count=sum(out.count for *_, out in outputs), parts=parts)

    def one_loss(self, loss: nn.Module, batch: Batch, monitor_kl: bool) -> TokenLossOutput:
        """One loss on ``batch``, with the one teacher, the cache, or the teachers' combination."""
        hidden = final_hidden_states(self.student, batch["input_ids"], batch["attention_mask"])
        head = self.student.get_output_embeddings()
        if self.combination is not None:
            return self.combination.loss(hidden, head, batch, self.teachers, self.losses, monitor_kl)
        teacher: dict[str, Any] = {}
        if loss.needs_teacher or (monitor_kl and not loss.cross_tokenizer):
            if self.logit_cache is not None:
                teacher = {"teacher_topk": self.logit_cache.lookup(batch)}
            elif self.teacher is not None:
                with torch.no_grad():
                    teacher_hidden = final_hidden_states(self.teacher, *loss.teacher_tokens(batch))
                teacher = {"teacher_hidden": teacher_hidden, "teacher_head": self.teacher.get_output_embeddings()}
                teacher.update(loss.alignment(batch))
        return loss(hidden, head, batch["labels"], monitor_kl=monitor_kl and bool(teacher), **teacher)

    # ----------------------------------------------------------------------------------- on-policy
    def _rng(self, batch_idx: int, *extra: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.current_epoch, batch_idx, *extra])

    def on_policy(self, batch_idx: int) -> bool:
        """Whether this batch is sampled from the student: probability ``lmbda``, the same on every rank."""
        return self.lmbda > 0 and self._rng(batch_idx).random() < self.lmbda

    @torch.no_grad()
    def sample(self, batch: Batch, batch_idx: int) -> dict[str, Tensor]:
        """Completions of the batch's prompts sampled from the student (eval mode, no gradient, seeded; token
        ids of a head padded beyond the shared vocabulary are never sampled)."""
        if "prompt_input_ids" not in batch:
            raise ConfigError("on-policy training needs prompts in the batches (prompt_input_ids); check llm.data")
        prompt_ids, prompt_mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
        seed = int(self._rng(batch_idx, self.global_rank, 1).integers(2**31))
        rows = self.student.get_output_embeddings().weight.shape[0]
        vocab = len(self.aligned.student.tokenizer) if self.aligned else self.loss.shared_vocab(rows, None)
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
        return {key: value.to(self.device) if isinstance(value, Tensor) else value for key, value in batch.items()}

    # ------------------------------------------------------------------------------------ training
    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self.window_tokens = torch.zeros((), dtype=torch.long, device=self.device)

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor | None:
        if self.on_policy(batch_idx):
            batch = self.sample(batch, batch_idx)
        elif "input_ids" not in batch:
            raise ConfigError(
                f"training batches hold prompts only but llm.mode.lmbda={self.lmbda} < 1 also trains on dataset "
                "completions; set llm.data.prompt_only=false"
            )
        self.check_heads(batch)
        out = self.token_loss(batch)
        if not self.finite_step(out.total, out.parts, {}):
            return None
        self.window_tokens = self.window_tokens + out.count
        tokens = max(int(out.count), 1)
        log = {"on_step": False, "on_epoch": True, "batch_size": tokens, "sync_dist": True}
        self.log("train/loss", out.total.detach() / tokens, prog_bar=True, **log)
        for name, value in out.parts.items():
            if name.startswith(("distill", "ce")):  # per-teacher parts: distill/<teacher>, summing to distill
                self.log(f"train/loss_{name}", value / tokens, **log)
        # A sum: Lightning divides it by accumulate_grad_batches, on_before_optimizer_step by the tokens.
        return out.total * self.trainer.accumulate_grad_batches

    def check_heads(self, batch: Batch) -> None:
        """Once per model, on the first batch that feeds it: its logits must be ``lm_head(last hidden)``."""
        models = {"llm.student.model": (self.student, self.loss, None)}
        if self.teacher is not None and self.loss.needs_teacher and self.logit_cache is None:
            models["llm.teacher.model"] = (self.teacher, self.loss, None)
        for index, (name, teacher) in enumerate(self.teachers.items()):
            if self.losses[name].needs_teacher:
                models[f"llm.teacher.teachers.{name}.model"] = (teacher, self.losses[name], index)
        for key, (model, loss, index) in models.items():
            if key in self.heads_checked:
                continue
            rows = batch
            if index is not None and "teacher_index" in batch:
                routed = (batch["teacher_index"] == index).nonzero().squeeze(1)
                if routed.numel() == 0:
                    continue  # no row for this teacher yet
                rows = select_rows(batch, routed)
            ids, mask = (
                (rows["input_ids"], rows["attention_mask"]) if model is self.student else loss.teacher_tokens(rows)
            )
            check_head(model, key, ids, mask)
            self.heads_checked.add(key)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide the summed gradients by the valid tokens of the accumulated batch on all ranks (DDP has
        averaged gradients over ranks: multiply back by the world size)."""
        tokens = self.trainer.strategy.reduce(self.window_tokens.float(), reduce_op="sum")
        scale = self.trainer.world_size / max(float(tokens), 1.0)
        for group in optimizer.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    param.grad.mul_(scale)
        self.window_tokens = torch.zeros_like(self.window_tokens)

    # ---------------------------------------------------------------------------------- evaluation
    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        out = self.token_loss(batch, monitor_kl=True)
        tokens = out.count.clamp(min=1).float()
        self.val_loss.update(out.total / tokens, weight=out.count.float())
        self.val_ce.update(out.parts["ce"] / tokens, weight=out.count.float())
        if "kl_to_teacher" in out.parts:
            self.val_kl.update(out.parts["kl_to_teacher"] / tokens, weight=out.count.float())
        for name, metric in self.val_teacher_kl.items():
            if f"kl_to_teacher/{name}" in out.parts:
                count = out.parts[f"tokens/{name}"]
                metric.update(out.parts[f"kl_to_teacher/{name}"] / count.clamp(min=1), weight=count)

    def on_validation_epoch_end(self) -> None:
        # torchmetrics syncs across ranks in compute(); the values are then equal on every rank.
        self.log("val/loss", self.val_loss.compute(), prog_bar=True, sync_dist=True)
        self.log("val/ppl", torch.exp(self.val_ce.compute()), prog_bar=True, sync_dist=True)
        if self.val_kl.update_called:
            self.log("val/kl_to_teacher", self.val_kl.compute(), sync_dist=True)
        for name, metric in self.val_teacher_kl.items():
            if metric.update_called:
                self.log(f"val/kl_to_teacher/{name}", metric.compute(), sync_dist=True)
        for metric in (self.val_loss, self.val_ce, self.val_kl, *self.val_teacher_kl.values()):
            metric.reset()
