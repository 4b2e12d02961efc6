"""Which student and teacher token ids spell the same string, across two tokenizers (GOLD's shared-vocabulary
part; :class:`VocabMapping`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

#: Space markers of sub-word vocabularies: byte-level BPE (GPT-2, Llama 3, Qwen) and SentencePiece.
SPACE_MARKERS = ("Ġ", "▁")


def normalize_token(token: str, continuation_prefix: str | None = None) -> str:
    """A vocabulary entry as the text it stands for, so entries of different tokenizers compare equal.

    The space markers ``'Ġ'`` (byte-level BPE) and ``'▁'`` (SentencePiece) become spaces, and a
    ``continuation_prefix`` (WordPiece's ``'##'``, given only for tokenizers that use one) is removed:
    ``'Ġcat'`` and ``'▁cat'`` are ``' cat'``, ``'##cat'`` is ``'cat'``.
    """
    if continuation_prefix and token.startswith(continuation_prefix) and len(token) > len(continuation_prefix):
        token = token[len(continuation_prefix) :]
    for marker in SPACE_MARKERS:
        token = token.replace(marker, " ")
    return token


def normalized_vocab(tokenizer: Any) -> dict[str, int]:
    """``{normalised token: id}`` of a Hugging Face tokenizer (or a ``tokenizers.Tokenizer``), added tokens
    included. The continuation prefix is read from the tokenizer's model (WordPiece: ``'##'``). A
    normalised string that several ids share (``'a'`` and ``'##a'``) is left out: it has no single match."""
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    prefix = getattr(getattr(backend, "model", None), "continuing_subword_prefix", None)
    ids: dict[str, list[int]] = {}
    for token, index in tokenizer.get_vocab().items():
        ids.setdefault(normalize_token(token, prefix), []).append(index)
    return {token: found[0] for token, found in ids.items() if len(found) == 1}


class VocabMapping:
    """Which student and teacher token ids spell the same string, and which ids have no counterpart.

    Built from two ``{token string: id}`` vocabularies whose strings are already comparable, or with
    :meth:`from_tokenizers` (strings normalised by :func:`normalize_token`). ``student_size`` and
    ``teacher_size`` are the widths of the models' logits (default: the largest id + 1); set them when
    an output layer is padded beyond its tokenizer, so the padding ids count as unmatched.

    Attributes:
        shared: ``{string: (student id, teacher id)}``, in student-id order.
        student_ids, teacher_ids: ``[M]`` long tensors, the shared pairs (``student_ids[m]`` is
            ``teacher_ids[m]``).
        student_unmatched, teacher_unmatched: the remaining ids of each side, ascending.
        student_size, teacher_size: the logits' widths.
    """

    def __init__(
        self,
        student_vocab: Mapping[str, int],
        teacher_vocab: Mapping[str, int],
        student_size: int | None = None,
        teacher_size: int | None = None,
    ) -> None:
        self.student_size = self._size(student_vocab, student_size, "student")
        self.teacher_size = self._size(teacher_vocab, teacher_size, "teacher")
        common = sorted(student_vocab.keys() & teacher_vocab.keys(), key=student_vocab.__getitem__)
        self.shared = {token: (student_vocab[token], teacher_vocab[token]) for token in common}
        self.student_ids = torch.tensor([s for s, _ in self.shared.values()], dtype=torch.long)
        self.teacher_ids = torch.tensor([t for _, t in self.shared.values()], dtype=torch.long)
        self.student_unmatched = self._complement(self.student_ids, self.student_size)
        self.teacher_unmatched = self._complement(self.teacher_ids, self.teacher_size)

    @classmethod
    def from_tokenizers(
        cls,
        student_tokenizer: Any,
        teacher_tokenizer: Any,
        student_size: int | None = None,
        teacher_size: int | None = None,
    ) -> VocabMapping:
        """The mapping of two Hugging Face tokenizers' :func:`normalized_vocab`."""
        return cls(normalized_vocab(student_tokenizer), normalized_vocab(teacher_tokenizer), student_size, teacher_size)

    @staticmethod
    def _size(vocab: Mapping[str, int], size: int | None, side: str) -> int:
        largest = max(vocab.values(), default=-1) + 1
        if size is None:
            return largest
        if size < largest:
            raise ValueError(f"{side}_size={size} is smaller than the {side} vocabulary (ids up to {largest - 1})")
        return size

    @staticmethod
    def _complement(ids: Tensor, size: int) -> Tensor:
        keep = torch.ones(size, dtype=torch.bool)
        keep[ids] = False
        return keep.nonzero().squeeze(1)

    def __repr__(self) -> str:
        return (
            f"VocabMapping({len(self.shared)} shared, {self.student_unmatched.numel()} student-only of "
            f"{self.student_size}, {self.teacher_unmatched.numel()} teacher-only of {self.teacher_size})"
        )
