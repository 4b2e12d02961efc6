"""Pruned students (Minitron: Muralidharan et al. 2024, "Compact Language Models via Pruning and Knowledge
Distillation"): the teacher with its least important decoder layers, MLP channels and attention heads removed,
importance measured on a calibration set, every kept weight copied. The student is a plain Llama (its config's
``num_hidden_layers``, ``intermediate_size``, ``num_attention_heads`` / ``num_key_value_heads`` and ``head_dim``
rewritten), so ``save_pretrained`` / ``from_pretrained`` and the rest of ``kd-llm-distill`` treat it as any other.

- :mod:`kd_lightning.llm.importance`: per-layer block, MLP-channel and head importances of the teacher on
  calibration token sequences (generated prompts in the teacher's chat template).
- :func:`plan_pruning`: which layers / heads / channels to keep (:class:`PrunePlan`), from the config's counts.
- :func:`apply_plan`: the student those indices describe. :func:`pruned`: all three (``llm/student=pruned``).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedModel

from kd_lightning.engine.errors import ConfigError
from kd_lightning.llm.importance import (
    KEY,
    Importance,
    calibration_batches,
    head_dim,
    measure_importance,
    plain,
    plain_calibration,
)
from kd_lightning.llm.models import decoder_layers, enable_gradient_checkpointing


@dataclass
class PrunePlan:
    """What a pruned student keeps: teacher ``layers`` (ascending) and, per kept layer, its query ``heads``,
    ``kv_heads`` and MLP ``channels`` (ascending teacher indices; the same count in every layer)."""

    layers: list[int]
    heads: list[list[int]]
    kv_heads: list[list[int]]
    channels: list[list[int]]


def keep_count(value: Any, total: int, key: str, fractions: bool = True) -> int:
    """How many of ``total`` to keep: ``value`` itself (an integer in 1..total), ``total`` for None, or (with
    ``fractions``) a float in (0, 1] times ``total``, rounded, at least 1; a :class:`ConfigError` naming ``key``."""
    if value is None:
        return total
    if isinstance(value, float) and fractions and 0 < value <= 1:
        return max(1, round(value * total))
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= total:
        fraction = " or a fraction in (0, 1]" if fractions else ""
        raise ConfigError(f"{key}={value} must be a count in 1..{total}{fraction} (the teacher has {total})")
    return value


def layer_choice(value: Any, total: int) -> int | list[int]:
    """``llm.student.keep_layers`` checked: a count (or fraction) of layers, or explicit teacher indices."""
    key = f"{KEY}.keep_layers"
    value = plain(value)
    if not isinstance(value, Sequence) or isinstance(value, str):
        return keep_count(value, total, key)
    if (
        not value
        or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < total for i in value)
        or len(set(value)) != len(value)
    ):
        raise ConfigError(f"{key}={value} must be distinct teacher layer indices in 0..{total - 1}")
    return sorted(value)


def head_count(value: Any, heads: int, kv_heads: int) -> int:
    """``llm.student.heads_keep`` checked: query heads per layer. Grouped-query attention keeps every key/value
    head, so the count must be a multiple of ``kv_heads`` (each group keeps as many of its query heads)."""
    key = f"{KEY}.heads_keep"
    count = keep_count(value, heads, key, fractions=False)
    if kv_heads != heads and count % kv_heads:
        raise ConfigError(
            f"{key}={value}: the teacher's {heads} query heads share {kv_heads} key/value heads; keep a multiple "
            f"of {kv_heads} (each key/value group keeps heads_keep/{kv_heads} of its {heads // kv_heads} query heads)"
        )
    return count


def top(scores: Tensor, count: int) -> list[int]:
    """Indices of the ``count`` highest ``scores``, ascending."""
    return sorted(torch.topk(scores, count).indices.tolist())


def plan_pruning(
    config: Any, importance: Importance | None, keep_layers: Any, mlp_keep: Any, heads_keep: Any
) -> PrunePlan:
    """The :class:`PrunePlan` of the configured counts: the most important layers (or the listed ones), and in
    each kept layer its most important MLP channels and query heads. With multi-head attention a head goes with
    its key/value head; with grouped-query attention every key/value head stays and each group keeps its most
    important ``heads_keep / num_key_value_heads`` query heads. ``importance`` may be None when nothing is chosen
    by it (:func:`needs_importance`)."""
    total, width = config.num_hidden_layers, config.intermediate_size
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    layers, channels = layer_choice(keep_layers, total), keep_count(mlp_keep, width, f"{KEY}.mlp_keep")
    head_keep = head_count(heads_keep, heads, kv_heads)
    if needs_importance(config, keep_layers, mlp_keep, heads_keep) and importance is None:
        raise ConfigError(f"{KEY}.calibration is null but pruning by importance needs it; set {KEY}.calibration")
    if isinstance(layers, int):
        layers = list(range(total)) if layers == total else top(importance.layers, layers)
    plan = PrunePlan(layers, [], [], [])
    group = heads // kv_heads
    for index in layers:
        plan.channels.append(list(range(width)) if channels == width else top(importance.channels[index], channels))
        if head_keep == heads:
            plan.heads.append(list(range(heads)))
            plan.kv_heads.append(list(range(kv_heads)))
        elif group == 1:
            plan.heads.append(top(importance.heads[index], head_keep))
            plan.kv_heads.append(plan.heads[-1])
        else:
            scores = importance.heads[index].view(kv_heads, group)
            plan.heads.append([g * group + h for g in range(kv_heads) for h in top(scores[g], head_keep // kv_heads)])
            plan.kv_heads.append(list(range(kv_heads)))
    return plan


def needs_importance(config: Any, keep_layers: Any, mlp_keep: Any, heads_keep: Any) -> bool:
    """Whether the configured counts choose anything by importance (else no calibration pass is run)."""
    layers = layer_choice(keep_layers, config.num_hidden_layers)
    return (
        (isinstance(layers, int) and layers < config.num_hidden_layers)
        or keep_count(mlp_keep, config.intermediate_size, f"{KEY}.mlp_keep") < config.intermediate_size
        or head_count(heads_keep, config.num_attention_heads, config.num_key_value_heads) < config.num_attention_heads
    )


def _rows(heads: list[int], width: int) -> Tensor:
    """Row indices of ``heads`` in a projection laid out head by head, ``width`` rows each."""
    return torch.tensor([head * width + offset for head in heads for offset in range(width)], dtype=torch.long)


def apply_plan(teacher: PreTrainedModel, plan: PrunePlan) -> PreTrainedModel:
    """A model of the teacher's class holding the kept slices of the teacher's weights (embeddings, norms and
    head copied whole); its config records ``kd_teacher_layers`` as :func:`~kd_lightning.llm.models.layer_subset`
    does."""
    config, width = copy.deepcopy(teacher.config), head_dim(teacher.config)
    config.head_dim = width  # hidden_size / num_attention_heads no longer gives it
    config.num_hidden_layers = len(plan.layers)
    config.num_attention_heads, config.num_key_value_heads = len(plan.heads[0]), len(plan.kv_heads[0])
    config.intermediate_size = len(plan.channels[0])
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[index] for index in plan.layers]
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the student is a plain float model
    student = type(teacher)(config)
    teacher_state, state = teacher.state_dict(), {}
    for name in student.state_dict():
        if not name.startswith("model.layers."):
            state[name] = teacher_state[name].detach().clone()
            continue
        number, rest = name.removeprefix("model.layers.").split(".", 1)
        i = int(number)
        tensor = teacher_state[f"model.layers.{plan.layers[i]}.{rest}"]
        q, kv = _rows(plan.heads[i], width), _rows(plan.kv_heads[i], width)
        channels = torch.tensor(plan.channels[i], dtype=torch.long)
        module, kind = rest.rsplit(".", 1)
        dim, index = {
            "self_attn.q_proj": (0, q),
            "self_attn.k_proj": (0, kv),
            "self_attn.v_proj": (0, kv),
            "self_attn.o_proj": (1, q),
            "mlp.gate_proj": (0, channels),
            "mlp.up_proj": (0, channels),
            "mlp.down_proj": (1, channels),
        }.get(module, (None, None))
        if dim is not None and (kind == "weight" or dim == 0):
            tensor = tensor.index_select(dim, index.to(tensor.device))
        state[name] = tensor.detach().clone()
    student.load_state_dict(state)
    student.config.kd_teacher_layers = plan.layers
    return student.to(next(teacher.parameters()).dtype).eval()


def pruned(
    teacher: PreTrainedModel,
    keep_layers: int | float | list[int] | None = None,
    mlp_keep: int | float | None = None,
    heads_keep: int | None = None,
    calibration: Mapping[str, Any] | None = None,
    gradient_checkpointing: bool = False,
) -> PreTrainedModel:
    """The teacher pruned in depth and/or width (Minitron), every kept weight copied; then distil as usual.

    ``keep_layers``: a count (or fraction) of decoder layers, the highest block importance kept, or explicit
    teacher indices; ``mlp_keep``: MLP channels per layer (count or fraction); ``heads_keep``: query heads per
    layer (see :func:`plan_pruning` for grouped-query attention); None keeps all. ``calibration``: the arguments
    of :func:`~kd_lightning.llm.importance.calibration_batches` (``tokenizer``, ``prompts``, ``num_examples``,
    ``max_length``), used only when something is chosen by :class:`Importance`. ``gradient_checkpointing``: see
    :func:`~kd_lightning.llm.models.enable_gradient_checkpointing`.
    """
    if not isinstance(teacher, PreTrainedModel):
        raise ConfigError(f"{KEY}=pruned needs an in-process teacher (a Hugging Face model); pick another student")
    layer = decoder_layers(teacher)[0]
    if not all(hasattr(layer, part) for part in ("self_attn", "mlp")) or not hasattr(layer.mlp, "down_proj"):
        raise ConfigError(f"{KEY}=pruned needs a Llama-style teacher (self_attn q/k/v/o_proj, mlp gate/up/down_proj)")
    config = teacher.config
    importance = None  # plan_pruning says so when it needs one
    if needs_importance(config, keep_layers, mlp_keep, heads_keep) and calibration is not None:
        importance = measure_importance(teacher, calibration_batches(**plain_calibration(calibration)))
    student = apply_plan(teacher, plan_pruning(config, importance, keep_layers, mlp_keep, heads_keep))
    enable_gradient_checkpointing(student, gradient_checkpointing)
    return student
