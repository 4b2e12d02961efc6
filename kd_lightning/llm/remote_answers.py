"""Checks of an OpenAI-compatible server's answers against the requests that asked for them.

:class:`~kd_lightning.llm.remote.RemoteTeacher` runs :func:`check_answer` on every answer, fresh or from its
response cache, before it is used or cached, so a misbehaving server ends the run with one line instead of
a silently wrong teacher (and never leaves a bad answer in the cache):

- chat (``/v1/chat/completions``): exactly ``n`` choices (indices ``0..n-1`` when given), each with text
  content (``message.content`` not null).
- scoring (``/v1/completions`` with ``echo`` and ``logprobs``): one ``top_logprobs`` entry per sent token,
  plus at most ``max_tokens`` generated ones, so the rows line up with the tokens (a server that adds a BOS
  token shifts every row); the echoed ``tokens``, when given, are the sent ids (``token_id:N``); every entry
  after the first names tokens by id and holds at least ``logprobs`` log-probabilities, each finite or
  ``-inf`` and at most 0 (:data:`LOGPROB_TOLERANCE`), not all ``-inf``, with probabilities summing to at most
  ``1 + MASS_TOLERANCE``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from kd_lightning.engine.errors import ConfigError

KEY = "llm.teacher.model"
TOKEN_ID = "token_id:"
#: A log-probability above 0 by at most this much is float rounding (read as 0); above it, an error.
LOGPROB_TOLERANCE = 1e-4
#: The probabilities of one position's top entries may sum to at most ``1 + MASS_TOLERANCE``.
MASS_TOLERANCE = 1e-3
_BLACK_BOX = (
    "grey-box token KD needs a server that scores given text (vLLM, SGLang); with any server use black-box KD "
    "instead: kd-llm-generate llm/teacher=remote, then kd-llm-distill llm/loss=sft llm/data=teacher_text"
)


class RemoteTeacherError(ConfigError):
    """The server could not be reached, refused a request, or gave an answer that does not fit its request.

    A :class:`~kd_lightning.engine.errors.ConfigError`, so the command-line tools report it as one line with
    exit code 2, like the other errors a user fixes in the configuration (the server's address, its model,
    the timeout), rather than as a traceback."""


def check_answer(endpoint: str, body: Mapping[str, Any], answer: Any, url: str) -> None:
    """Raise :class:`RemoteTeacherError` unless ``answer`` (JSON) fits the request ``body`` sent to
    ``endpoint`` (``chat`` or ``completions``) of the server at ``url``."""
    choices = answer.get("choices") if isinstance(answer, dict) else None
    if not isinstance(choices, list) or not all(isinstance(choice, dict) for choice in choices):
        raise RemoteTeacherError(
            f"{KEY}.base_url={url} answered a {endpoint} request without a list of choices: {_fix()}"
        )
    if endpoint == "chat":
        chat_texts(answer, body.get("n", 1), url)
    elif body.get("echo") and body.get("logprobs"):
        prompt_scores(answer, body["prompt"], body["logprobs"], body.get("max_tokens", 1), url)


def chat_texts(answer: Mapping[str, Any], n: int, url: str) -> list[str]:
    """The ``n`` completion texts of a checked chat answer, in choice-index order."""
    choices = answer["choices"]
    if len(choices) != n:
        raise RemoteTeacherError(
            f"{KEY}.base_url={url} returned {len(choices)} chat completions for n={n} (generate.num_samples): "
            "use a server that supports n, or generate.num_samples=1"
        )
    indices = [choice.get("index") for choice in choices]
    if all(isinstance(index, int) for index in indices):
        if sorted(indices) != list(range(n)):
            raise RemoteTeacherError(f"{KEY}.base_url={url} returned chat choices with indices {indices} for n={n}")
        choices = sorted(choices, key=lambda choice: choice["index"])
    texts = []
    for choice in choices:
        message = choice.get("message")
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, str):
            raise RemoteTeacherError(
                f"{KEY}.base_url={url} returned a chat completion without text (message.content={content!r}, "
                f"finish_reason={choice.get('finish_reason')!r}): check {KEY}.model is a text model and the "
                "server's chat template (a refusal or a tool call has no text)"
            )
        texts.append(content.strip())
    return texts


def prompt_scores(
    answer: Mapping[str, Any], token_ids: Sequence[int], top_k: int, max_tokens: int, url: str
) -> list[dict[int, float] | None]:
    """Per sent token, the ``{token id: log-probability}`` of the distribution that predicts it (``None`` for
    the first token), from a checked scoring answer; log-probabilities in ``(0, LOGPROB_TOLERANCE]`` read 0."""
    count = len(token_ids)
    logprobs = answer["choices"][0].get("logprobs") if answer["choices"] else None
    tops = logprobs.get("top_logprobs") if isinstance(logprobs, dict) else None
    if not isinstance(tops, list) or not tops or (count > 1 and all(entry is None for entry in tops[1:count])):
        raise RemoteTeacherError(
            f"{KEY}.base_url={url} returned no log-probabilities of the prompt tokens (echo + logprobs); {_BLACK_BOX}"
        )
    if not count <= len(tops) <= count + max_tokens:
        raise RemoteTeacherError(
            f"{KEY}.base_url={url} returned {len(tops)} log-probability entries for {count} prompt tokens "
            f"(+ at most {max_tokens} generated): its rows would not line up with the tokens (a server that adds "
            f"a BOS token shifts them); serve {KEY}.model without adding special tokens to token-id prompts"
        )
    tokens = logprobs.get("tokens")
    if tokens is not None:
        echoed = [_token_id(token, url) for token in tokens] if isinstance(tokens, list) else []
        sent = [int(token) for token in token_ids]
        if len(echoed) != len(tops) or echoed[:count] != sent:
            raise RemoteTeacherError(
                f"{KEY}.base_url={url} echoed the tokens {echoed[:4]}... ({len(echoed)}, for {len(tops)} entries), "
                f"not the {count} sent {sent[:4]}...: its rows would not line up with the tokens; serve "
                f"{KEY}.model so that it scores token-id prompts as sent (no added BOS token)"
            )
    _check_token_logprobs(logprobs.get("token_logprobs"), url)
    out: list[dict[int, float] | None] = [None]
    for position, entry in enumerate(tops[1:], start=1):
        row = _entry(entry, position, top_k, url)
        if position < count:
            out.append(row)
    return out


def _entry(entry: Any, position: int, top_k: int, url: str) -> dict[int, float]:
    """One position's ``{token id: log-probability}``, checked."""
    if not isinstance(entry, dict):
        raise RemoteTeacherError(
            f"{KEY}.base_url={url} returned no log-probabilities for token position {position} ({entry!r}); "
            f"{_BLACK_BOX}"
        )
    if len(entry) < top_k:
        raise RemoteTeacherError(
            f"{KEY}.base_url={url} returned {len(entry)} log-probabilities per token, fewer than "
            f"llm.teacher_cache.top_k={top_k}: lower llm.teacher_cache.top_k to what the server allows"
        )
    row = {}
    for token, value in entry.items():
        row[_token_id(token, url)] = min(_logprob(value, f"token position {position}", url), 0.0)
    values = list(row.values())
    if all(value == -math.inf for value in values):
        raise RemoteTeacherError(
            f"{KEY}.base_url={url} returned only -inf log-probabilities at token position {position}: {_fix()}"
        )
    if sum(math.exp(value) for value in values) > 1 + MASS_TOLERANCE:
        raise RemoteTeacherError(
            f"{KEY}.base_url={url} returned probabilities summing to {sum(map(math.exp, values)):.4f} > 1 at token "
            f"position {position} (logits or unnormalized scores, not log-probabilities): {_fix()}"
        )
    return row


def _check_token_logprobs(values: Any, url: str) -> None:
    """The echoed tokens' own log-probabilities, when given: each null, finite or ``-inf``, at most 0."""
    if values is None:
        return
    if not isinstance(values, list):
        raise RemoteTeacherError(f"{KEY}.base_url={url} returned token_logprobs={values!r}, not a list: {_fix()}")
    for position, value in enumerate(values):
        if value is not None:
            _logprob(value, f"token_logprobs[{position}]", url)


def _logprob(value: Any, where: str, url: str) -> float:
    """``value`` as a log-probability: a number, not NaN, at most :data:`LOGPROB_TOLERANCE`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or value > LOGPROB_TOLERANCE:
        raise RemoteTeacherError(
            f"{KEY}.base_url={url} returned the log-probability {value!r} at {where} (must be a number <= 0, "
            f"not NaN): {_fix()}"
        )
    return float(value)


def _token_id(token: Any, url: str) -> int:
    """The id in a ``token_id:N`` token name."""
    digits = token[len(TOKEN_ID) :] if isinstance(token, str) and token.startswith(TOKEN_ID) else ""
    if not (digits.isascii() and digits.isdigit()):
        raise RemoteTeacherError(
            f"{KEY}.base_url={url} names tokens by text ({token!r}), not id; the grey-box path asks for "
            "return_tokens_as_token_ids (vLLM's option): use a server that supports it"
        )
    return int(digits)


def _fix() -> str:
    return (
        f"the server at {KEY}.base_url is misbehaving; check that it serves {KEY}.model in float32 or bfloat16 "
        "(NaN log-probabilities come from float16 overflow) and is vLLM/SGLang-compatible"
    )
