"""Calibration importances of a Llama-style decoder LM for Minitron pruning (Muralidharan et al. 2024): how much
each decoder layer changes its input, and how strongly each MLP channel and attention head fires, averaged over
calibration prompts in the teacher's chat template (:func:`calibration_batches`, :func:`measure_importance`).
:mod:`kd_lightning.llm.pruning` keeps the most important ones."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kd_lightning.engine.errors import ConfigError
from kd_lightning.llm.models import decoder_layers
from kd_lightning.llm.prompts import chat_ids, make_prompts

#: The config node every error of pruning names.
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


def plain_calibration(calibration: Mapping[str, Any]) -> dict[str, Any]:
    """The calibration node as keyword arguments (its ``tokenizer`` already built by ``instantiate``)."""
    return {name: plain(value) if name != "tokenizer" else value for name, value in dict(calibration).items()}
