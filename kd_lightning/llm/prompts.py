"""Offline, seeded prompt sets: templated instructions and arithmetic word problems with checkable answers.

Every prompt belongs to exactly one split, decided by a hash of its text (about one in five is
``heldout``), so the training and held-out sets never share a prompt whatever the seeds or sizes.
"""

from __future__ import annotations

import hashlib
import operator
import random
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from kd_lightning.engine.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Split = Literal["train", "heldout"]
Kind = Literal["instructions", "arithmetic", "multistep", "mixed"]
SPLITS = ("train", "heldout")
KINDS = ("instructions", "arithmetic", "multistep", "mixed")

#: One prompt in this many (by hash) is held out.
HELDOUT_EVERY = 5

_TOPICS = (
    "the ocean",
    "autumn",
    "a busy city",
    "coffee",
    "mountains",
    "a library",
    "the moon",
    "bicycles",
    "rain",
    "a small dog",
    "friendship",
    "the desert",
    "music",
    "a garden",
    "winter",
    "trains",
    "the sun",
    "a forest",
    "cooking",
    "the night sky",
    "a river",
    "birds",
    "a market",
    "snow",
    "a school",
    "the wind",
    "books",
    "a bridge",
    "summer",
    "cats",
    "a farm",
    "the beach",
)
_INSTRUCTIONS = (
    "Write one sentence about {topic}.",
    "Describe {topic} in two sentences.",
    "List three words related to {topic}.",
    "Give a short title for a story about {topic}.",
    "Write a short question about {topic}.",
    "Name two colours you associate with {topic}.",
    "Explain in one sentence why people like {topic}.",
    "Write a haiku about {topic}.",
)
_NAMES = ("Tom", "Sara", "Ali", "Mia", "Ben", "Lena", "Omar", "Zoe")
_ITEMS = ("apples", "pencils", "stickers", "marbles", "books", "cookies", "coins", "cards")
_ADD = "{name} has {a} {items} and gets {b} more. How many {items} does {name} have now?"
_SUB = "{name} has {a} {items} and gives away {b}. How many {items} does {name} have left?"
_MUL = "{name} buys {a} bags with {b} {items} in each bag. How many {items} does {name} buy in total?"
#: Appended to arithmetic problems so the final answer is easy to find (see :func:`extract_answer`).
ANSWER_FORMAT = "End your reply with 'The answer is N.'"


@dataclass(frozen=True)
class Prompt:
    """A prompt with a stable ``id`` (a hash of its text) and, for arithmetic problems, its integer answer
    and (multi-step problems) a reference solution written out step by step."""

    id: str
    text: str
    kind: str
    answer: int | None = None
    solution: str | None = None


def prompt_id(text: str) -> str:
    """Stable identifier of a prompt's text (first 16 hex digits of its SHA-1)."""
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def split_of(text: str) -> Split:
    """The split a prompt text belongs to: fixed by its hash, independent of seeds and set sizes."""
    return "heldout" if int(prompt_id(text), 16) % HELDOUT_EVERY == 0 else "train"


def _instruction(rng: random.Random) -> Prompt:
    text = rng.choice(_INSTRUCTIONS).format(topic=rng.choice(_TOPICS))
    return Prompt(prompt_id(text), text, "instructions")


def _arithmetic(rng: random.Random, max_operand: int) -> Prompt:
    name, items = rng.choice(_NAMES), rng.choice(_ITEMS)
    op = rng.choice(("add", "sub", "mul"))
    high = min(max_operand, 9) if op == "mul" else max_operand  # products stay small
    a, b = rng.randint(2, high), rng.randint(2, high)
    if op == "add":
        template, answer = _ADD, a + b
    elif op == "sub":
        a, b = max(a, b) + 1, min(a, b)
        template, answer = _SUB, a - b
    else:
        template, answer = _MUL, a * b
    text = f"{template.format(name=name, a=a, b=b, items=items)} {ANSWER_FORMAT}"
    return Prompt(prompt_id(text), text, "arithmetic", answer)


def _multistep(rng: random.Random, max_operand: int) -> Prompt:
    """Three operations on one quantity (gets more, buys bags of, gives away), solved step by step."""
    name, items = rng.choice(_NAMES), rng.choice(_ITEMS)
    total = rng.randint(2, max_operand)
    sentences = [f"{name} has {total} {items}."]
    steps = [f"{name} starts with {total} {items}."]
    for op in rng.sample(("add", "mul", "sub"), 3):
        if op == "add":
            more = rng.randint(2, max_operand)
            sentences.append(f"Then {name} gets {more} more.")
            steps.append(f"{total} + {more} = {total + more}.")
            total += more
        elif op == "mul":
            bags, each = rng.randint(2, 5), rng.randint(2, 5)
            sentences.append(f"Then {name} buys {bags} bags with {each} {items} in each bag.")
            bought = bags * each
            steps.append(f"{bags} bags of {each} is {bags} * {each} = {bought}. {total} + {bought} = {total + bought}.")
            total += bought
        else:
            away = rng.randint(1, max(1, total - 1))
            sentences.append(f"Then {name} gives away {away}.")
            steps.append(f"{total} - {away} = {total - away}.")
            total -= away
    question = f"How many {items} does {name} have now?"
    text = f"{' '.join(sentences)} {question} Think step by step. {ANSWER_FORMAT}"
    solution = f"{' '.join(steps)} The answer is {total}."
    return Prompt(prompt_id(text), text, "multistep", total, solution)


def make_prompts(
    kind: Kind, num_prompts: int, seed: int, split: Split = "train", max_operand: int = 20
) -> list[Prompt]:
    """``num_prompts`` distinct prompts of ``kind`` from ``split``, the same list for the same arguments.

    ``mixed`` alternates instructions and arithmetic problems. Instructions come from a finite pool
    (8 templates x 32 topics, about 205 train / 51 held-out prompts); asking for more is an error.
    """
    if kind not in KINDS:
        raise ConfigError(f"prompts.kind={kind!r} is not one of {list(KINDS)}")
    if split not in SPLITS:
        raise ConfigError(f"prompts.split={split!r} is not one of {list(SPLITS)}")
    if num_prompts < 1:
        raise ConfigError(f"prompts.num_prompts={num_prompts} must be >= 1")
    if max_operand < 2:
        raise ConfigError(f"prompts.max_operand={max_operand} must be >= 2")
    rng = random.Random(f"{kind}-{seed}")
    makers = {
        "instructions": [_instruction],
        "arithmetic": [lambda r: _arithmetic(r, max_operand)],
        "multistep": [lambda r: _multistep(r, max_operand)],
        "mixed": [_instruction, lambda r: _arithmetic(r, max_operand)],
    }[kind]
    prompts: dict[str, Prompt] = {}
    for _ in range(200 * num_prompts):
        prompt = makers[len(prompts) % len(makers)](rng)
        if split_of(prompt.text) == split:
            prompts.setdefault(prompt.id, prompt)
        if len(prompts) == num_prompts:
            return list(prompts.values())
    raise ConfigError(
        f"prompts.num_prompts={num_prompts}: only {len(prompts)} distinct {kind} prompts exist in the {split} split; "
        "lower prompts.num_prompts (or raise prompts.max_operand for arithmetic)"
    )


_ANSWER_IS = re.compile(r"answer\s*(?:is|:|=)\s*\**\s*(-?\d[\d,]*)", re.IGNORECASE)
_INTEGER = re.compile(r"-?\d[\d,]*")
_EQUATION = re.compile(r"(-?\d+)\s*([-+*])\s*(-?\d+)\s*=\s*(-?\d+)")
_APPLY = {"+": operator.add, "-": operator.sub, "*": operator.mul}


def extract_answer(completion: str, strict: bool = False) -> int | None:
    """The final integer answer of a completion: the number after the last "answer is" / "answer:" (the answer
    line :data:`ANSWER_FORMAT` asks for); unless ``strict``, else the last integer in the text (lm-eval-harness's
    "flexible-extract" vs "strict-match"); ``None`` if there is none. Thousands separators are ignored."""
    matches = _ANSWER_IS.findall(completion) or ([] if strict else _INTEGER.findall(completion))
    for match in reversed(matches):
        digits = match.replace(",", "")
        if digits.lstrip("-"):
            return int(digits)
    return None


def has_answer_line(completion: str) -> bool:
    """Whether the completion states its answer as :data:`ANSWER_FORMAT` asks ("The answer is N.")."""
    return extract_answer(completion, strict=True) is not None


def written_steps(completion: str) -> list[tuple[str, bool]]:
    """Each equation ``a op b = c`` the completion writes (op: + - *), as ``(op, whether c is right)``: a
    process check beside the outcome verifier, which accepts a right answer reached through a wrong step."""
    return [(op, _APPLY[op](int(a), int(b)) == int(c)) for a, op, b, c in _EQUATION.findall(completion)]


def is_correct(completion: str, answer: int, strict: bool = False) -> bool:
    """Whether the completion's final answer (:func:`extract_answer`, ``strict`` or not) equals ``answer``."""
    return extract_answer(completion, strict) == answer


def chat_ids(tokenizer: PreTrainedTokenizerBase, text: str, system_prompt: str | None = None) -> list[int]:
    """Token ids of ``text`` as a user turn in the tokenizer's chat template, ending with the assistant
    header (the model continues from there). ``system_prompt=None`` keeps the template's default."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
    messages.append({"role": "user", "content": text})
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    return list(encoded["input_ids"])
