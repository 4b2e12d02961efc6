"""An estimate of the peak memory per device of LM distillation, printed by ``kd-llm-distill`` before fit.

:func:`estimate_memory` adds up, in bytes:

- weights: every parameter and buffer of the student and of the in-process teachers, at their own dtypes;
- gradients: one per trainable parameter (all of the student, or only its LoRA adapters), at its dtype;
- optimizer: AdamW's two float32 states (``exp_avg``, ``exp_avg_sq``) per trainable parameter;
- activations: what the student's forward keeps for backward (:func:`student_activation_bytes`), plus the
  teachers' final hidden states the loss reads (``2 * B * T * H_t`` values: the states and their valid rows);
- logits: the loss's chunk of logits, ``chunk * V * 4`` bytes times the ``[chunk, V]`` float32 tensors
  alive at once in a chunk's backward (:func:`live_logit_tensors`).

The total is their sum. Gradients and activations are not all alive at once (backward frees activations as
it writes gradients); that slack covers what the count leaves out: RMSNorm statistics, the attention's
log-sum-exp, the teachers' forward, optimizer and clipping temporaries. Activations are counted at the
student's parameter dtype (no autocast). tests/test_llm_memory.py holds the total within 25% of the peak
measured by torch's CPU allocator over a few training steps.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

#: AdamW keeps two float32 states per trainable parameter.
ADAM_STATE_BYTES = 2 * 4


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak memory per device in bytes, by part; :attr:`total` is their sum (see the module docstring)."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    logits: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.logits

    def describe(self) -> str:
        """One line: the total and its parts."""
        names = ("weights", "gradients", "optimizer", "activations", "logits")
        parts = ", ".join(f"{name} {human(getattr(self, name))}" for name in names)
        return f"estimated peak memory per device: {human(self.total)} ({parts})"


def human(size: int) -> str:
    """Bytes in GiB from 1 GiB up, else in MiB."""
    return f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"


def tensor_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers, each at its own dtype (shared tensors once)."""
    seen: dict[int, int] = {}
    for tensor in [*module.parameters(), *module.buffers()]:
        seen[tensor.data_ptr()] = tensor.numel() * tensor.element_size()
    return sum(seen.values())


def student_activation_bytes(config: object, batch: int, sequence: int, dtype_bytes: int, checkpointed: int = 0) -> int:
    r"""Bytes the student's forward keeps for backward, for a Llama-style decoder (Hugging Face's
    ``LlamaDecoderLayer``: RMSNorm, attention with rotary embeddings, SwiGLU MLP), counted from the tensors
    its autograd graph saves, per token of a layer:

    - the layer input :math:`H` (the residual);
    - each RMSNorm: its normalised input and its output, :math:`2H` (times two norms);
    - attention: rotated queries :math:`H`, keys and values :math:`2H` (with grouped queries too: they are
      repeated to every query head whenever a padding mask is given), the output :math:`H`
      (SDPA keeps it; reshaping it for ``o_proj`` is a view), the residual sum feeding the second norm :math:`H`;
      SDPA also keeps the padding mask it converts to the queries' dtype, ``[B, 1, T, T]``: :math:`T` per
      token (the eager implementation keeps the attention probabilities instead, :math:`n_{heads} T`);
    - the SwiGLU MLP: gate and up projections, ``silu(gate)``, their product, :math:`4I`;

    so :math:`10H + 4I + T` values per token and layer (batches are padded: the mask is always counted).
    A ``checkpointed`` layer (activation checkpointing) keeps only its input (:math:`H`), and backward
    recomputes one such layer at a time (one layer's full set on top). Outside the layers: the final norm
    (input, normalised, output, :math:`3H`), the loss's valid rows of the final states (:math:`H`), and the
    boolean ``[B, 1, T, T]`` attention mask built for padded batches.
    """
    hidden = config.hidden_size
    heads = config.num_attention_heads
    intermediate = getattr(config, "intermediate_size", None) or 4 * hidden
    layers = config.num_hidden_layers
    eager = getattr(config, "_attn_implementation", "sdpa") == "eager"
    per_layer = 10 * hidden + 4 * intermediate + (heads if eager else 1) * sequence
    checkpointed = min(checkpointed, layers)
    kept = (layers - checkpointed) * per_layer + checkpointed * hidden + (per_layer if checkpointed else 0)
    return (kept + 4 * hidden) * batch * sequence * dtype_bytes + batch * sequence * sequence


def live_logit_tensors(temperature: float) -> int:
    """``[chunk, V]`` float32 tensors alive at once in the backward of one chunk of the token loss
    (:meth:`~kd_lightning.llm.token_loss.TokenDistillationLoss._chunk_sums`, recomputed there): the student's
    log-softmax, the teacher's log-probabilities and probabilities, and two gradients in flight: 5; at a
    temperature other than 1 the tempered student and teacher log-probabilities add 2."""
    return 5 if temperature == 1.0 else 7


def estimate_memory(
    student: nn.Module,
    teachers: Iterable[object],
    trainable: Iterable[nn.Parameter],
    batch_size: int,
    max_length: int,
    loss: object | None = None,
) -> MemoryEstimate:
    """The :class:`MemoryEstimate` of training ``student`` (a Hugging Face causal LM, LoRA-wrapped or not;
    gradient checkpointing read from it) on ``batch_size`` rows of ``max_length`` tokens against the
    modules among ``teachers`` (None or a remote teacher: nothing), ``trainable`` being the parameters the
    optimizer updates. The
    token ``loss`` gives the chunk (``chunk_size``; None: every token at once), the vocabulary
    (``vocab_size``; None: the student head's rows) and the ``temperature``."""
    modules = [teacher for teacher in teachers if isinstance(teacher, nn.Module)]
    trainable = [p for p in trainable if p.requires_grad]
    tokens = batch_size * max_length
    dtype_bytes = next(student.parameters()).element_size()
    checkpointed = sum(
        isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing for m in student.modules()
    )
    activations = student_activation_bytes(student.config, batch_size, max_length, dtype_bytes, checkpointed)
    for teacher in modules:
        activations += 2 * tokens * teacher.config.hidden_size * next(teacher.parameters()).element_size()
    chunk = min(getattr(loss, "chunk_size", None) or tokens, tokens)
    vocab = getattr(loss, "vocab_size", None) or student.get_output_embeddings().weight.shape[0]
    return MemoryEstimate(
        weights=tensor_bytes(student) + sum(tensor_bytes(teacher) for teacher in modules),
        gradients=sum(p.numel() * p.element_size() for p in trainable),
        optimizer=sum(p.numel() for p in trainable) * ADAM_STATE_BYTES,
        activations=activations,
        logits=chunk * vocab * 4 * live_logit_tensors(getattr(loss, "temperature", 1.0)),
    )
