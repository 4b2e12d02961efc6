"""LMMethod: what every LM distillation scheme shares (``conf/llm/method/*.yaml`` builds one subclass)."""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import nullcontext
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from kd_lightning.engine.caching.store import weights_digest
from kd_lightning.engine.errors import ConfigError, TrainingDiverged
from kd_lightning.llm.hidden import HiddenStateLoss
from kd_lightning.llm.logit_cache import LogitCache
from kd_lightning.llm.protocol import TokenLoss, batch_source
from kd_lightning.llm.served import ServedTeacher
from kd_lightning.llm.tokens import TokenLossOutput, final_hidden_states, sequence_inputs
from kd_lightning.methods.base import Method, OptimizerFactory, SchedulerFactory
from kd_lightning.methods.lm.heads import check_cache, check_head, check_packing
from kd_lightning.methods.lm.metrics import TokenMetrics
from kd_lightning.methods.lm.rules import SchemeRules

Batch = Mapping[str, Any]
#: What a run does when its training loss goes non-finite, in this tool's keys.
LM_DIVERGENCE_ADVICE = (
    "lower optimizer.lr (or set trainer.gradient_clip_val), check llm.teacher.model's weights, or set "
    "llm.nonfinite=skip to skip such steps"
)


class LMMethod(TokenMetrics, SchemeRules, Method):
    """Base of the LM schemes: a trainable causal-LM ``student`` and a frozen ``teacher`` (or its outputs
    from a ``logit_cache``), one :class:`~kd_lightning.llm.protocol.TokenLoss`, Lightning's loop.

    - Teachers: frozen (``eval()``, ``requires_grad_(False)``), run under ``no_grad``, never in the optimizer,
      left out of checkpoints unless ``save_teacher`` (put back from memory on load): one ``teacher``, or
      several by name (``teachers``, for schemes that combine them). ``logit_cache``: the one teacher's
      top-k outputs read back instead (:class:`~kd_lightning.llm.logit_cache.LogitCache`); ``served_teacher``:
      asked of a server every step (:class:`~kd_lightning.llm.served.ServedTeacher`).
    - Student: fully fine-tuned, or LoRA adapters only when ``lora`` (``peft.LoraConfig`` arguments) is given.
    - Tokens: each batch says where its labelled tokens came from (``token_source``) and the loss applies
      each term only to the sources it declares (:mod:`kd_lightning.llm.protocol`).
    - Normalisation: the loss returns sums over valid tokens; gradients are divided by the valid tokens of
      the whole accumulated batch (every micro-batch of an optimizer step, every rank) in
      :meth:`on_before_optimizer_step`, before clipping, so every token weighs the same.
    - Head check: once per model, its logits must be ``lm_head(last hidden state)`` (:func:`check_head`).

    A scheme overrides :meth:`training_batch` (what a step trains on) and :meth:`loss_on` (the loss of a
    batch), and states its rules as class methods (:meth:`check_config`, :meth:`check_options`) that
    ``kd-llm-distill`` runs before any model is built. Class attributes read by the recipe:
    ``teacher_range`` (teachers it takes: one via ``llm.teacher``, several via ``llm.teacher.teachers``),
    ``takes_logit_cache`` (``llm/teacher_cache`` may replace the live teacher), ``takes_served_teacher`` (a
    teacher behind a server may score its steps, ``llm/teacher=remote``), ``uses_loss`` (``llm.loss``
    is its objective), ``token_sources`` (where the tokens it trains on come from: some term of ``llm.loss``
    must read one of them), ``takes_hidden`` (``llm/hidden`` may add its hidden-state term to the loss).

    Logged: ``train/loss``, ``train/loss_ce``, ``train/loss_distill`` (per token), ``val/loss``, ``val/ppl``
    (student perplexity on the validation completions), ``val/kl_to_teacher`` (forward KL at T = 1 per token;
    over the cache's buckets in cache mode; not across tokenizers).
    """

    divergence_advice = LM_DIVERGENCE_ADVICE
    nonfinite_group = "llm"

    def __init__(
        self,
        student: nn.Module,
        loss: TokenLoss,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        teacher: nn.Module | None = None,
        teachers: Mapping[str, nn.Module] | None = None,
        logit_cache: LogitCache | None = None,
        lora: Mapping[str, Any] | None = None,
        save_teacher: bool = False,
        nonfinite: str = "error",
        nonfinite_check_every: int | str = "auto",
        hidden: HiddenStateLoss | None = None,
        served_teacher: ServedTeacher | None = None,
    ) -> None:
        super().__init__(
            optimizer,
            scheduler,
            save_teacher=save_teacher,
            nonfinite=nonfinite,
            nonfinite_check_every=nonfinite_check_every,
        )
        remote = served_teacher is not None
        names = ["teacher"] if teacher is not None or logit_cache is not None or remote else []
        type(self).check_config(loss, [*names, *(teachers or {})], cached=logit_cache is not None, remote=remote)
        if logit_cache is not None:
            check_cache(logit_cache, loss, student)
        if lora:
            from peft import LoraConfig, get_peft_model

            student = get_peft_model(student, LoraConfig(**{"task_type": "CAUSAL_LM", **lora}))
        self.student = student
        self.teacher = self.add_frozen("teacher", teacher) if teacher is not None else None
        self.teachers: dict[str, nn.Module] = {}
        for name, model in (teachers or {}).items():
            if not name.isidentifier():
                raise ConfigError(f"llm.teacher.teachers: {name!r} is not a valid teacher name (letters, digits, _)")
            self.teachers[name] = self.add_frozen(f"teacher_{name}", model)
        self.loss = loss
        self.logit_cache = logit_cache
        self.served_teacher = served_teacher
        self.hidden = hidden
        if hidden is not None:
            cross = loss is not None and loss.cross_tokenizer
            type(self).check_hidden(cached=logit_cache is not None, remote=remote, cross_tokenizer=cross)
            if self.teacher is None:
                raise ConfigError("llm/hidden reads a live teacher's decoder layers: give llm/teacher (a model)")
            hidden.bind(self.student, self.teacher)
        self.heads_checked: set[str] = set()
        self.teacher_digests: dict[str, str] = {}
        self.window_tokens = torch.zeros((), dtype=torch.long)
        #: The epoch's per-token training losses so far, on the device: name -> (sum, tokens of its steps).
        self.train_sums: dict[str, tuple[Tensor, Tensor]] = {}
        self.init_metrics()

    # ----------------------------------------------------------------------------- scheme hooks
    def before_fit(self, datamodule: L.LightningDataModule, tokenizer: Any, cache_dir: Any) -> None:
        """Called by the recipe before ``fit``: e.g. add the student's own responses. Nothing here."""

    def training_batch(self, batch: Batch, batch_idx: int) -> Batch:
        """What training step ``batch_idx`` trains on: the dataset batch itself here."""
        if "input_ids" not in batch:
            raise ConfigError(
                f"training batches hold prompts only but llm/method={self.config_name()} trains on dataset "
                "completions; set llm.data.prompt_only=false (or llm/method=on_policy with llm.method.lmbda=1)"
            )
        return batch

    def loss_on(self, batch: Batch, monitor_kl: bool = False) -> TokenLossOutput:
        """Loss sums of ``batch`` (the teacher, or the cache, runs only when needed)."""
        return self.one_loss(self.loss, batch, monitor_kl)

    def head_models(self, batch: Batch) -> dict[str, tuple[nn.Module, Batch, Any]]:
        """``{config key: (model, rows it reads, loss)}`` whose heads :meth:`check_heads` verifies."""
        models: dict[str, tuple[nn.Module, Batch, Any]] = {"llm.student.model": (self.student, batch, None)}
        if self.teacher is not None and self.loss.needs_teacher and self.logit_cache is None:
            models["llm.teacher.model"] = (self.teacher, batch, self.loss)
        return models

    # -------------------------------------------------------------------------------- the loss
    def teacher_outputs(self, loss: TokenLoss, batch: Batch, monitor_kl: bool) -> dict[str, Any]:
        """The teacher's keyword arguments of ``loss`` on ``batch``: top-k rows (cached, re-tempered to the loss's
        temperature; or served), live hidden states, or none."""
        if not (loss.needs_teacher or (monitor_kl and not loss.cross_tokenizer)):
            return {}
        if self.logit_cache is not None:
            return {"teacher_topk": self.logit_cache.lookup(batch, loss.temperature)}
        if self.served_teacher is not None:
            return {"teacher_topk": self.served_teacher.lookup(batch)}
        if self.teacher is None:
            return {}
        with torch.no_grad():
            hidden = final_hidden_states(self.teacher, *loss.teacher_tokens(batch))
        return {"teacher_hidden": hidden, "teacher_head": self.teacher.get_output_embeddings(), **loss.alignment(batch)}

    def one_loss(self, loss: TokenLoss, batch: Batch, monitor_kl: bool) -> TokenLossOutput:
        """``loss`` on ``batch`` with this method's teacher, told where the batch's tokens came from; in
        training, plus ``llm.hidden.weight`` times the hidden-state term per token (``parts["hidden"]``)."""
        term = self.hidden if self.hidden is not None and self.training else None
        with term.capture("student") if term else nullcontext({}) as student_states:
            hidden = final_hidden_states(self.student, *sequence_inputs(batch))
        with term.capture("teacher") if term else nullcontext({}) as teacher_states:
            teacher = self.teacher_outputs(loss, batch, monitor_kl)
        monitor = monitor_kl and bool(teacher)
        head = self.student.get_output_embeddings()
        out = loss(hidden, head, batch["labels"], monitor_kl=monitor, source=batch_source(batch), **teacher)
        return term.add_to(out, student_states, teacher_states, batch["attention_mask"]) if term else out

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Student logits (full vocabulary: for inspection, not for the loss)."""
        return self.student(input_ids=input_ids, attention_mask=attention_mask).logits

    # ------------------------------------------------------------------------------------ training
    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self.window_tokens = torch.zeros((), dtype=torch.long, device=self.device)
        self.train_sums = {}

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor | None:
        try:
            return self.train_on(batch, batch_idx)
        except TrainingDiverged:
            raise
        except Exception:
            # A step that fails on values an unchecked non-finite step left (e.g. sampling from NaN
            # probabilities) reports that step instead; this process's record only: no collective here.
            self.nonfinite_guard.check(None)
            raise

    def train_on(self, batch: Batch, batch_idx: int) -> Tensor | None:
        """One training step: the loss of what :meth:`training_batch` returns, its sums kept on the device for
        the epoch's ``train/loss*`` (no per-step host read)."""
        batch = self.training_batch(batch, batch_idx)
        self.check_heads(batch)
        out = self.loss_on(batch)
        if not self.finite_step(out.total, out.parts, {}):
            return None
        self.window_tokens = self.window_tokens + out.count
        tokens = out.count.clamp(min=1)
        sums = {"loss": out.total.detach()}
        logged = ("distill", "ce", "hidden")
        sums |= {f"loss_{name}": value for name, value in out.parts.items() if name.startswith(logged)}
        for name, value in sums.items():  # per-teacher / per-side parts: loss_distill/<name>
            held = self.train_sums.get(name)
            self.train_sums[name] = (value, tokens) if held is None else (held[0] + value, held[1] + tokens)
        # A sum: Lightning divides it by accumulate_grad_batches, on_before_optimizer_step by the tokens.
        return out.total * self.trainer.accumulate_grad_batches

    def on_train_epoch_end(self) -> None:
        """``train/loss`` and ``train/loss_<part>`` per token over the epoch's steps on every process."""
        super().on_train_epoch_end()
        for name, (total, tokens) in self.train_sums.items():
            summed = self.trainer.strategy.reduce(torch.stack([total.float(), tokens.float()]), reduce_op="sum")
            self.log(f"train/{name}", summed[0] / summed[1], prog_bar=name == "loss")

    def check_heads(self, batch: Batch) -> None:
        """Once per model, on the first batch that feeds it: its logits must be ``lm_head(last hidden)``."""
        for key, (model, rows, loss) in self.head_models(batch).items():
            if key not in self.heads_checked:
                tokens = sequence_inputs(rows) if loss is None else loss.teacher_tokens(rows)
                check_head(model, key, *tokens[:2])
                if len(tokens) > 2:  # packed rows
                    check_packing(model, key, *tokens[:2])
                self.heads_checked.add(key)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide the summed gradients by the valid tokens of the accumulated batch on all ranks (DDP has
        averaged gradients over ranks: multiply back by the world size)."""
        tokens = self.trainer.strategy.reduce(self.window_tokens.float(), reduce_op="sum")
        scale = self.trainer.world_size / tokens.clamp(min=1.0)  # on the device: no host read
        for group in optimizer.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    param.grad.mul_(scale)
        self.window_tokens = torch.zeros_like(self.window_tokens)

    # ------------------------------------------------------------------------------------ resuming
    def teacher_identities(self) -> dict[str, str]:
        """What the student is distilled from, by teacher name (weights digests; the cache's key)."""
        if not self.teacher_digests:
            self.teacher_digests = {name: weights_digest(model) for name, model in self.frozen_models().items()}
            if self.logit_cache is not None:
                self.teacher_digests["logit_cache"] = self.logit_cache.path.name
            if self.served_teacher is not None:
                self.teacher_digests["served"] = self.served_teacher.identity
        return self.teacher_digests

    def resume_state(self) -> dict[str, Any]:
        return {**super().resume_state(), "teachers": self.teacher_identities()}
