"""A byte-level BPE tokenizer trained offline on the project's prompt corpus: a student tokenizer that
differs from the teacher's (cross-tokenizer distillation), built in about a second, no download."""

from __future__ import annotations

from collections.abc import Mapping

from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from kd_lightning.engine.errors import ConfigError
from kd_lightning.llm.data import reference_completion
from kd_lightning.llm.models import CHATML_TEMPLATE
from kd_lightning.llm.prompts import make_prompts

#: ChatML special tokens (ids 0, 1, 2): unknown, turn start (also BOS), turn end (EOS and padding).
SPECIAL_TOKENS = ("<unk>", "<|im_start|>", "<|im_end|>")

#: Prompts per kind of the default corpus (the instruction pool holds about 205 training prompts).
DEFAULT_CORPUS = {"instructions": 200, "arithmetic": 2000}

#: Roles of the chat template, so "user\n" and "assistant\n" tokenize as in a real chat vocabulary.
_CHAT_TURNS = ("system\n", "user\n", "assistant\n")


def prompt_corpus(num_prompts: Mapping[str, int], seed: int) -> list[str]:
    """``num_prompts[kind]`` training-split prompts of each kind (:func:`~kd_lightning.llm.prompts.make_prompts`),
    the arithmetic problems' reference completions and the chat template's role headers."""
    texts = list(_CHAT_TURNS)
    for kind, count in num_prompts.items():
        for prompt in make_prompts(kind, count, seed):
            texts.append(prompt.text)
            if prompt.answer is not None:
                texts.append(reference_completion(prompt.answer))
    return texts


def train_bpe_tokenizer(
    vocab_size: int = 2048,
    num_prompts: Mapping[str, int] | None = None,
    seed: int = 0,
) -> PreTrainedTokenizerBase:
    """A byte-level BPE tokenizer (GPT-2 pre-tokenisation, ``vocab_size`` entries including the 256 byte
    symbols and :data:`SPECIAL_TOKENS`) trained with the ``tokenizers`` library on :func:`prompt_corpus`
    (``num_prompts``: prompts per kind, default :data:`DEFAULT_CORPUS`), with SmolLM2's ChatML chat
    template (no default system turn). Deterministic: the same arguments give
    the same vocabulary. Any text encodes (bytes are in the vocabulary), so teacher completions on topics
    outside the corpus still tokenize, only into shorter pieces."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if not isinstance(vocab_size, int) or vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ConfigError(
            f"llm.student.tokenizer.vocab_size={vocab_size} must be an integer >= {256 + len(SPECIAL_TOKENS)} "
            "(the 256 byte symbols plus the special tokens)"
        )
    backend = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS[0]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = prompt_corpus(num_prompts or DEFAULT_CORPUS, seed)
    backend.train_from_iterator(corpus, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=SPECIAL_TOKENS[0],
        bos_token=SPECIAL_TOKENS[1],
        eos_token=SPECIAL_TOKENS[2],
        pad_token=SPECIAL_TOKENS[2],
        additional_special_tokens=list(SPECIAL_TOKENS[1:]),
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer
