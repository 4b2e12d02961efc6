"""Which groups of student tokens and of teacher tokens spell the same piece of text, from each tokenizer's
character offsets of that text (the span alignment GOLD's loss and the aligned encoder read)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

#: One aligned span: the student tokens and the teacher tokens (index ranges) that spell the same text.
AlignedSpan = tuple[range, range]


def _offset_list(offsets: Sequence[Sequence[int]] | Tensor, side: str) -> list[tuple[int, int]]:
    pairs = offsets.tolist() if isinstance(offsets, Tensor) else offsets
    out = []
    for i, pair in enumerate(pairs):
        start, end = (int(v) for v in pair)
        if not 0 <= start <= end:
            raise ValueError(f"{side} offset {i} is ({start}, {end}); offsets must be (start, end), 0 <= start <= end")
        out.append((start, end))
    return out


def _boundaries(offsets: list[tuple[int, int]], side: str) -> dict[int, int]:
    """``{character position: index of the last text token ending there}`` over the non-empty tokens, without
    positions inside a character that the next token shares (overlapping offsets of byte-level tokens)."""
    ends: dict[int, int] = {}
    last_start = last_end = 0
    for i, (start, end) in enumerate(offsets):
        if start == end:
            continue
        if start < last_start or end < last_end:
            raise ValueError(
                f"{side} offsets are not in text order at token {i}: ({start}, {end}) after ({last_start}, {last_end})"
            )
        if start < last_end:  # this token shares a character with the previous one: no cut between them
            ends.pop(last_end, None)
        ends[end] = i
        last_start, last_end = start, end
    return ends


def align_spans(
    student_offsets: Sequence[Sequence[int]] | Tensor, teacher_offsets: Sequence[Sequence[int]] | Tensor
) -> list[AlignedSpan]:
    """Group both tokenisations of one text into spans that cover the same characters.

    ``*_offsets`` are each tokenizer's ``(start, end)`` character offsets of the *same* text, one pair
    per token, as a Hugging Face fast tokenizer returns with ``return_offsets_mapping=True`` (a list or a
    ``[T, 2]`` tensor). A span boundary is a character position where both tokenisations end a token
    (and no token of either side continues past it inside the same character, as when a byte-level BPE
    splits one character into several tokens sharing its offsets). Tokens with empty offsets, such as the
    special tokens ``(0, 0)`` a post-processor adds (BOS, CLS, SEP, EOS), belong to no span. Whitespace
    that one tokenizer leaves out of its offsets is harmless: only token ends are compared.

    Returns ``[(student_tokens, teacher_tokens), ...]`` in text order, each a ``range`` of token indices;
    e.g. ``"unbelievable cats"`` as ``["un", "believ", "able", " cats"]`` and
    ``["unbeliev", "able", " c", "ats"]`` gives ``[(range(0, 2), range(0, 1)), (range(2, 3), range(1, 2)),
    (range(3, 4), range(2, 4))]``.

    Raises ``ValueError`` when the offsets cannot describe the same text (their text ends at different
    characters, or only one side has text), when offsets go backwards, or when an empty-offset token
    falls inside a span (a special token in the middle of the text: align one segment at a time).
    """
    student, teacher = _offset_list(student_offsets, "student"), _offset_list(teacher_offsets, "teacher")
    student_ends, teacher_ends = _boundaries(student, "student"), _boundaries(teacher, "teacher")
    if not student_ends and not teacher_ends:
        return []
    student_last, teacher_last = max(student_ends, default=0), max(teacher_ends, default=0)
    if student_last != teacher_last:
        raise ValueError(
            f"the offsets do not describe the same text: the student's tokens end at character {student_last}, "
            f"the teacher's at {teacher_last}; tokenize the same string with both tokenizers"
        )
    spans: list[AlignedSpan] = []
    next_student = next_teacher = 0
    for end in sorted(student_ends.keys() & teacher_ends.keys()):
        pair = []
        for offsets, first, last, side in (
            (student, next_student, student_ends[end], "student"),
            (teacher, next_teacher, teacher_ends[end], "teacher"),
        ):
            while offsets[first][0] == offsets[first][1]:  # special tokens before the span's text
                first += 1
            inside = [i for i in range(first, last + 1) if offsets[i][0] == offsets[i][1]]
            if inside:
                raise ValueError(
                    f"{side} token {inside[0]} has empty offsets but lies inside the text span ending at "
                    f"character {end}; align each text segment separately"
                )
            pair.append(range(first, last + 1))
        spans.append((pair[0], pair[1]))
        next_student, next_teacher = pair[0].stop, pair[1].stop
    return spans
