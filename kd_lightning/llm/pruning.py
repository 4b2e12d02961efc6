"""Pruned students (Minitron: Muralidharan et al. 2024, "Compact Language Models via Pruning and Knowledge
Distillation"): the teacher with its least important decoder layers, MLP channels and attention heads removed,
importance measured on a calibration set, every kept weight copied. The student is a plain Llama (its config's
``num_hidden_layers``, ``intermediate_size``, ``num_attention_heads`` / ``num_key_value_heads`` and ``head_dim``
rewritten), so ``save_pretrained`` / ``from_pretrained`` and the rest of ``kd-llm-distill`` treat it as any other.

- :func:`measure_importance`: per-layer block, MLP-channel and head importances of the teacher on calibration
  token sequences (:func:`calibration_batches`: generated prompts in the teacher's chat template).
- :func:`plan_pruning`: which layers / heads / channels to keep (:class:`PrunePlan`), from the config's counts.
- :func:`apply_plan`: the student those indices describe. :func:`pruned`: all three (``llm/student=pruned``).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kd_lightning.engine.errors import ConfigError
from kd_lightning.llm.models import decoder_layers, enable_gradient_checkpointing
from kd_lightning.llm.prompts import chat_ids, make_prompts

KEY = "llm.student"


@dataclass
class Importance:
    """Calibration importances of a Llama's decoder layers, averaged over the calibration tokens ``t``:

    - ``layers[l] = mean_t 1 - cos(x_t, y_t)``, ``x`` / ``y`` layer ``l``'s input / output hidden states (the
      block importance of Minitron's depth pruning: a layer that barely changes its input scores ~0);
    - ``channels[l, j] = mean_t |silu(gate_j x_t) * up_j x_t|``, MLP intermediate channel ``j``'s activation
      (the input of ``down_proj``; Minitron's activation-based width importance);
    - ``heads[l, h] = mean_t ||o_{t,h}||_2``, query head ``h``'s attention output (its slice of ``o_proj``'s input).
    """

    layers: Tensor
    channels: Tensor
    heads: Tensor


@dataclass
class PrunePlan:
    """What a pruned student keeps: teacher ``layers`` (ascending) and, per kept layer, its query ``heads``,
    ``kv_heads`` and MLP ``channels`` (ascending teacher indices; the same count in every layer)."""

    layers: list[int]
    heads: list[list[int]]
    kv_heads: list[list[int]]
    channels: list[list[int]]


def head_dim(config: Any) -> int:
    """A Llama config's per-head width (``head_dim``, else ``hidden_size / num_attention_heads``)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def calibration_batches(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Mapping[str, Any],
    num_examples: int = 32,
    max_length: int = 128,
    system_prompt: str | None = None,
) -> list[Tensor]:
    """``num_examples`` token sequences (one per calibration example, at most ``max_length`` tokens): prompts of
    :func:`~kd_lightning.llm.prompts.make_prompts` (``prompts``: its arguments but ``num_prompts``) in the
    tokenizer's chat template, as the run's data encodes them."""
    for name, value, low in (("num_examples", num_examples, 1), ("max_length", max_length, 2)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"{KEY}.calibration.{name}={value} must be an integer >= {low}")
    arguments = {**plain(prompts), "num_prompts": num_examples}
    texts = [prompt.text for prompt in make_prompts(**arguments)]
    return [torch.tensor(chat_ids(tokenizer, text, system_prompt)[:max_length]) for text in texts]


def plain(value: Any) -> Any:
    """``value`` with OmegaConf containers turned into Python ones."""
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


@torch.no_grad()
def measure_importance(model: PreTrainedModel, batches: Iterable[Tensor]) -> Importance:
    """The :class:`Importance` of ``model``'s layers, heads and channels over the calibration sequences
    ``batches`` (1-d token ids, each run alone: no padding enters the averages)."""
    layers = decoder_layers(model)
    heads, width = model.config.num_attention_heads, head_dim(model.config)
    sums = Importance(
        torch.zeros(len(layers)),
        torch.zeros(len(layers), model.config.intermediate_size),
        torch.zeros(len(layers), heads),
    )
    inputs: dict[int, Tensor] = {}

    def hooks(index: int, layer: torch.nn.Module) -> list[Any]:
        def layer_input(_module: Any, args: tuple, kwargs: dict) -> None:
            inputs[index] = (args[0] if args else kwargs["hidden_states"]).float()

        def layer_output(_module: Any, _args: tuple, _kwargs: dict, output: Any) -> None:
            out = (output[0] if isinstance(output, tuple) else output).float()
            sums.layers[index] += (1 - F.cosine_similarity(inputs.pop(index), out, dim=-1)).sum().cpu()

        def channel_input(_module: Any, args: tuple) -> None:
            sums.channels[index] += args[0].float().abs().flatten(0, -2).sum(0).cpu()

        def head_input(_module: Any, args: tuple) -> None:
            per_head = args[0].float().reshape(-1, heads, width)
            sums.heads[index] += per_head.norm(dim=-1).sum(0).cpu()

        return [
            layer.register_forward_pre_hook(layer_input, with_kwargs=True),
            layer.register_forward_hook(layer_output, with_kwargs=True),
            layer.mlp.down_proj.register_forward_pre_hook(channel_input),
            layer.self_attn.o_proj.register_forward_pre_hook(head_input),
        ]

    handles = [handle for index, layer in enumerate(layers) for handle in hooks(index, layer)]
    device, tokens = next(model.parameters()).device, 0
    try:
        for ids in batches:
            model(input_ids=ids.view(1, -1).to(device), use_cache=False)
            tokens += ids.numel()
    finally:
        for handle in handles:
            handle.remove()
    if tokens == 0:
        raise ConfigError(f"{KEY}.calibration gave no tokens; raise {KEY}.calibration.num_examples")
    return Importance(sums.layers / tokens, sums.channels / tokens, sums.heads / tokens)


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
    of :func:`calibration_batches` (``tokenizer``, ``prompts``, ``num_examples``, ``max_length``), used only
    when something is chosen by :class:`Importance`. ``gradient_checkpointing``: see
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


def plain_calibration(calibration: Mapping[str, Any]) -> dict[str, Any]:
    """The calibration node as keyword arguments (its ``tokenizer`` already built by ``instantiate``)."""
    return {name: plain(value) if name != "tokenizer" else value for name, value in dict(calibration).items()}
