r"""Several LM teachers for one student: per-row routing and per-token mixtures.

- :class:`RowRouting` (as TRL's multi-teacher distillation): each example names its teacher (a
  ``teacher`` column of the data, or its prompt kind through ``by_kind``); every teacher runs on its own
  rows only, with its own loss (teachers may differ in size and, with a cross-tokenizer loss, tokenizer).
- :class:`TokenMixture` (ensemble distillation, e.g. Fukuda et al. 2017; the multi-teacher target of
  NeMo RL): every teacher scores every token and the student fits the mixture
  :math:`p_{mix}(v) = \sum_k w_k\, p_k(v)` with fixed weights or, with ``confidence``, per-token weights
  :math:`w_k \propto \max_v p_k(v)`. Teachers must share the student's tokenizer.

Both return the loss sums of :class:`~kd_lightning.llm.token_loss.TokenLossOutput` with per-teacher
parts (``distill/<name>``, ``tokens/<name>`` and, when monitored, ``kl_to_teacher/<name>``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.engine.errors import ConfigError
from kd_lightning.llm.protocol import batch_source
from kd_lightning.llm.tokens import TokenLossOutput, final_hidden_states, head_logits, linear_head, sequence_inputs
from kd_lightning.losses.mixture import mixture_logits

Batch = Mapping[str, Any]


def select_rows(batch: Batch, rows: Tensor) -> dict[str, Any]:
    """The ``rows`` of every per-row entry of ``batch`` (tensors and lists whose length is the batch size)."""
    size = len(batch["input_ids"])
    picked: dict[str, Any] = {}
    for key, value in batch.items():
        if isinstance(value, Tensor) and value.dim() and value.shape[0] == size:
            picked[key] = value.index_select(0, rows.to(value.device))
        elif isinstance(value, list) and len(value) == size:
            picked[key] = [value[i] for i in rows.tolist()]
        else:
            picked[key] = value
    return picked


def add_parts(into: dict[str, Tensor], parts: Mapping[str, Tensor]) -> None:
    """Add loss-part sums into ``into``, key by key."""
    for key, value in parts.items():
        into[key] = into[key] + value if key in into else value


class TeacherCombination:
    """How several teachers' outputs become one distillation loss; subclasses set :attr:`needs_one_tokenizer`."""

    needs_one_tokenizer = False

    def __init__(self) -> None:
        self.names: list[str] = []

    def bind(self, names: Sequence[str]) -> None:
        """The teachers' names, in config order (``llm.teacher.teachers``)."""
        self.names = list(names)

    def loss(
        self,
        student_hidden: Tensor,
        student_head: nn.Module,
        batch: Batch,
        teachers: Mapping[str, nn.Module],
        losses: Mapping[str, nn.Module],
        monitor_kl: bool,
    ) -> TokenLossOutput:
        raise NotImplementedError


class RowRouting(TeacherCombination):
    """Each row is distilled from the one teacher it names (see the module docstring).

    Args:
        column: the field of a JSONL record that names its teacher.
        by_kind: ``{prompt kind: teacher}`` for records without that field and for generated prompts
            (e.g. ``{arithmetic: math, instructions: chat}``).
    """

    def __init__(self, column: str = "teacher", by_kind: Mapping[str, str] | None = None) -> None:
        super().__init__()
        self.column = column
        self.by_kind = dict(by_kind or {})

    def bind(self, names: Sequence[str]) -> None:
        super().bind(names)
        unknown = sorted(set(self.by_kind.values()) - set(self.names))
        if unknown:
            raise ConfigError(
                f"llm.teacher.combine.by_kind routes to {unknown}, not in llm.teacher.teachers {self.names}"
            )

    def teacher_index(self, example: Mapping[str, Any]) -> int:
        """The index (in :attr:`names`) of the teacher of one example record."""
        name = example.get(self.column) or self.by_kind.get(example.get("kind") or "")
        if name not in self.names:
            found = f"names teacher {name!r}" if name else f"has no {self.column!r} field and no kind in by_kind"
            raise ConfigError(
                f"an llm.data example ({str(example.get('prompt'))[:40]!r}...) {found}; teachers are {self.names}: "
                f"set the {self.column!r} field of every record or llm.teacher.combine.by_kind"
            )
        return self.names.index(name)

    def loss(
        self,
        student_hidden: Tensor,
        student_head: nn.Module,
        batch: Batch,
        teachers: Mapping[str, nn.Module],
        losses: Mapping[str, nn.Module],
        monitor_kl: bool,
    ) -> TokenLossOutput:
        if "teacher_index" not in batch:
            raise ConfigError("row routing needs batches with teacher_index; build llm.data with the routing")
        total = count = None
        parts: dict[str, Tensor] = {}
        for index, name in enumerate(self.names):
            rows = (batch["teacher_index"] == index).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            sub = select_rows(batch, rows)
            loss, teacher = losses[name], teachers[name]
            extra: dict[str, Any] = {}
            if loss.needs_teacher or (monitor_kl and not loss.cross_tokenizer):
                with torch.no_grad():
                    extra["teacher_hidden"] = final_hidden_states(teacher, *loss.teacher_tokens(sub))
                extra.update(teacher_head=teacher.get_output_embeddings(), **loss.alignment(sub))
            out = loss(
                student_hidden.index_select(0, rows),
                student_head,
                sub["labels"],
                monitor_kl=monitor_kl and "teacher_hidden" in extra,
                source=batch_source(sub),
                **extra,
            )
            total = out.total if total is None else total + out.total
            count = out.count if count is None else count + out.count
            add_parts(parts, out.parts)
            parts[f"distill/{name}"] = out.parts["distill"]
            parts[f"tokens/{name}"] = out.count.float()
            if "kl_to_teacher" in out.parts:
                parts[f"kl_to_teacher/{name}"] = out.parts["kl_to_teacher"]
        if total is None:
            raise ValueError("a batch whose rows name no teacher")
        return TokenLossOutput(total=total, count=count, parts=parts)


class TokenMixture(TeacherCombination):
    r"""Every teacher scores every token; the student fits their mixture (see the module docstring).

    The mixture at the loss temperature :math:`T` enters the token loss as logits
    :math:`T \log \sum_k w_k \,\mathrm{softmax}(z_k / T)`, whose tempered softmax is exactly the mixture.
    Teachers' full logits ``[B, L, V]`` are held (one per teacher): mind the memory at large vocabularies.
    The monitored ``kl_to_teacher`` (T = 1) reads the mixture formed at the loss temperature.

    Args:
        weights: ``{teacher: weight}`` (normalised to sum to 1); null: equal weights.
        confidence: per-token weights proportional to each teacher's top-1 probability (at T = 1)
            instead of fixed ones.
    """

    needs_one_tokenizer = True

    def __init__(self, weights: Mapping[str, float] | None = None, confidence: bool = False) -> None:
        super().__init__()
        if weights is not None and confidence:
            raise ConfigError("llm.teacher.combine: set weights or confidence=true, not both")
        self.weights = dict(weights) if weights is not None else None
        self.confidence = confidence

    def bind(self, names: Sequence[str]) -> None:
        super().bind(names)
        weights = self.weights
        numbers = weights is not None and all(
            isinstance(w, int | float) and not isinstance(w, bool) and math.isfinite(w) for w in weights.values()
        )
        if weights is not None and (
            not numbers or set(weights) != set(self.names) or min(weights.values()) < 0 or not sum(weights.values())
        ):
            raise ConfigError(
                f"llm.teacher.combine.weights={self.weights} must give every teacher of {self.names} a "
                "finite weight >= 0, not all zero"
            )

    def mixture_logits(self, teacher_logits: Sequence[Tensor], temperature: float) -> Tensor:
        """``T * log sum_k w_k softmax(z_k / T)`` over ``[K]`` logits ``[..., V]`` (>= float32;
        :func:`~kd_lightning.losses.mixture.mixture_logits`)."""
        stacked = torch.stack([z.float() for z in teacher_logits])
        if self.confidence:
            top1 = F.softmax(stacked, dim=-1).amax(dim=-1)
            log_w = torch.log(top1 / top1.sum(dim=0, keepdim=True))
        else:
            weights = self.weights or dict.fromkeys(self.names, 1.0)
            w = torch.tensor([weights[name] for name in self.names], dtype=stacked.dtype, device=stacked.device)
            log_w = torch.log(w / w.sum()).reshape(-1, *([1] * (stacked.dim() - 2)))
        return mixture_logits(stacked, log_w, temperature)

    def loss(
        self,
        student_hidden: Tensor,
        student_head: nn.Module,
        batch: Batch,
        teachers: Mapping[str, nn.Module],
        losses: Mapping[str, nn.Module],
        monitor_kl: bool,
    ) -> TokenLossOutput:
        loss, source = losses[self.names[0]], batch_source(batch)
        if not (loss.needs_teacher or monitor_kl):
            return loss(student_hidden, student_head, batch["labels"], source=source)
        logits = {}
        with torch.no_grad():
            for name in self.names:
                hidden = final_hidden_states(teachers[name], *sequence_inputs(batch))
                weight, bias = linear_head(teachers[name].get_output_embeddings(), "llm.teacher.teachers")
                logits[name] = head_logits(hidden, weight, bias, loss.vocab_size or weight.shape[0])
            mixed = self.mixture_logits(list(logits.values()), loss.temperature)
        out = loss(
            student_hidden, student_head, batch["labels"], teacher_logits=mixed, monitor_kl=monitor_kl, source=source
        )
        parts = dict(out.parts)
        if monitor_kl:
            for name, teacher_logits in logits.items():
                single = loss(
                    student_hidden,
                    student_head,
                    batch["labels"],
                    teacher_logits=teacher_logits,
                    monitor_kl=True,
                    source=source,
                )
                parts[f"kl_to_teacher/{name}"] = single.parts["kl_to_teacher"]
                parts[f"tokens/{name}"] = single.count.float()
        return TokenLossOutput(total=out.total, count=out.count, parts=parts)


class RoutedEncoder:
    """Encodes each example for the teacher its row is routed to, and adds ``teacher_index`` to batches.

    ``encoders[k]`` encodes the rows of teacher ``k``: an ``ExampleEncoder`` when every teacher reads the
    student's tokens, an ``AlignedEncoder`` each (``teacher_*`` keys in that teacher's tokens) otherwise.
    """

    def __init__(self, encoders: Sequence[Any], routing: RowRouting) -> None:
        if len({type(encoder) for encoder in encoders}) != 1:
            raise ConfigError(
                "routed teachers mix the student's tokenizer and their own: use a cross-tokenizer loss "
                "(llm/loss=gold aligns same-tokenizer teachers too) or give every teacher the student's tokenizer"
            )
        self.encoders = list(encoders)
        self.routing = routing
        self.student = getattr(encoders[0], "student", encoders[0])

    def route(self, example: Mapping[str, Any]) -> int:
        return self.routing.teacher_index(example)

    def encode(self, prompt: str, completion: str | None, eos: bool = True, teacher: int = 0) -> dict[str, Any]:
        """The example encoded for teacher ``teacher`` (an index), with its index."""
        return {**self.encoders[teacher].encode(prompt, completion, eos), "teacher_index": teacher}

    def collate(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """One batch of rows of any teachers (teacher-side padding ids differ but are masked out)."""
        batch = self.encoders[0].collate(examples)
        batch["teacher_index"] = torch.tensor([example["teacher_index"] for example in examples])
        return batch
