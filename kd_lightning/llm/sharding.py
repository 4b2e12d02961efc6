"""FSDP for LM distillation, configured so the frozen teacher is sharded layer by layer.

Lightning's ``strategy: fsdp`` without a wrapping policy shards the LightningModule as one root unit: the
teacher's parameters live in it and are all-gathered for the whole step, every step, so the teacher costs
its full size on every device. :func:`layer_wrapped_fsdp` makes every decoder layer, the student's and the
teacher's alike, its own FSDP unit: a teacher layer is gathered when the teacher's forward reaches it and
freed right after (``FULL_SHARD``), the teacher never runs backward, and only the embeddings, final norms
and heads stay in the root unit. ``use_orig_params`` lets frozen and trainable parameters share the root
unit (only the student's reach the optimizer). Used by ``trainer=fsdp_llm``.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

from lightning.pytorch.strategies import FSDPStrategy
from torch import nn

from kd_lightning.engine.errors import ConfigError

#: Decoder blocks of the Hugging Face model families used here (add yours via ``layer_classes``).
LLAMA_LAYER = "transformers.models.llama.modeling_llama.LlamaDecoderLayer"


def import_class(path: str, key: str) -> type[nn.Module]:
    """The class at a dotted ``path``; a :class:`ConfigError` naming ``key`` when it does not exist."""
    module_name, _, name = path.rpartition(".")
    try:
        found = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError):
        raise ConfigError(f"{key}: {path!r} is not an importable class (module.path.ClassName)") from None
    if not (isinstance(found, type) and issubclass(found, nn.Module)):
        raise ConfigError(f"{key}: {path!r} is not an nn.Module class")
    return found


def layer_wrapped_fsdp(
    layer_classes: Sequence[str] = (LLAMA_LAYER,),
    sharding_strategy: str = "FULL_SHARD",
    activation_checkpointing: bool = False,
    cpu_offload: bool = False,
    state_dict_type: str = "full",
) -> FSDPStrategy:
    """An :class:`FSDPStrategy` whose units are the decoder layers ``layer_classes`` (module docstring);
    ``activation_checkpointing`` recomputes the same layers' activations in backward (only the student's
    run backward)."""
    if not layer_classes:
        raise ConfigError("trainer.strategy.layer_classes needs the decoder layer class(es) of the models")
    classes = {import_class(path, "trainer.strategy.layer_classes") for path in layer_classes}
    return FSDPStrategy(
        auto_wrap_policy=classes,
        activation_checkpointing_policy=classes if activation_checkpointing else None,
        sharding_strategy=sharding_strategy,
        cpu_offload=cpu_offload,
        state_dict_type=state_dict_type,
        use_orig_params=True,
    )
