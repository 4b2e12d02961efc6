"""Token-level distillation needs one vocabulary: checks that teacher and student share a tokenizer and have a
logit for every token of it, failing early with the config key to change (:func:`check_tokenizers`)."""

from __future__ import annotations

from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kd_lightning.engine.errors import ConfigError


def embedding_rows(model: PreTrainedModel) -> int:
    """Rows of the model's output layer: the logit width, which may exceed the tokenizer (padding)."""
    return model.get_output_embeddings().weight.shape[0]


def check_tokenizers(
    teacher: PreTrainedModel,
    student: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    student_tokenizer: PreTrainedTokenizerBase | None = None,
) -> int:
    """Fail early unless teacher and student share one vocabulary; return its size ``len(tokenizer)``.

    Logit widths may differ (a vocabulary padded to a multiple of 64, say): token losses compare the
    first ``len(tokenizer)`` logits. Different tokenizers (``student_tokenizer`` not token-for-token
    equal) cannot be distilled token by token.
    """
    if student_tokenizer is not None and not same_tokenizer(student_tokenizer, tokenizer):
        raise ConfigError(
            "llm.student and llm.teacher use different tokenizers; token-level KD needs one vocabulary: "
            "use a cross-tokenizer loss (llm/loss=uld or llm/loss=gold), distil black-box on teacher text "
            "(llm.loss.alpha=0), or build the student from the teacher (llm/student=layer_subset)"
        )
    vocab = len(tokenizer)
    for key, model in (("llm.teacher", teacher), ("llm.student", student)):
        check_vocab_rows(model, tokenizer, key)
    return vocab


def same_tokenizer(first: PreTrainedTokenizerBase, second: PreTrainedTokenizerBase) -> bool:
    """Whether two tokenizers map every token, special ones included, to the same id."""
    return first is second or (
        first.get_vocab() == second.get_vocab() and first.all_special_ids == second.all_special_ids
    )


def check_vocab_rows(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, key: str) -> None:
    """Fail early unless ``model`` has an output logit for every token of ``tokenizer`` (a remote teacher,
    not a module, is checked by its answers)."""
    if not isinstance(model, nn.Module):
        return
    vocab = len(tokenizer)
    if embedding_rows(model) < vocab:
        raise ConfigError(
            f"{key} has {embedding_rows(model)} output logits but the tokenizer has {vocab} tokens; "
            f"{key} must be built for this tokenizer (vocab_size >= {vocab})"
        )
