"""Generate the offline text-classification demo set: short reviews whose sentiment needs word order.

    python scripts/make_sentiment_data.py ~/.kd_lightning/data/sentiment
    kd-distill experiment=text_sentiment_bert

Each review is a verdict on an aspect ("the soup was really good"), optionally negated ("was not good"), and
optionally followed by a contrasting second verdict ("..., but the staff was rude"), which decides the label
when present; filler clauses surround them. A bag of words cannot read it (the same words appear in both
classes); a model that reads order can. Writes ``train.csv`` (``--labelled`` rows, plus ``--unlabelled`` rows
with label -1: the transfer set the teacher labels), ``val.csv``, ``test.csv`` (columns text, label; 1 =
positive) and a WordPiece tokenizer trained on the training text (``tokenizer/``, loadable with
``AutoTokenizer.from_pretrained``). Deterministic given ``--seed``.
"""

from __future__ import annotations

import argparse
import csv
import random
from pathlib import Path

ASPECTS = [
    "the soup",
    "the pasta",
    "the room",
    "the staff",
    "the movie",
    "the plot",
    "the phone",
    "the battery",
    "the screen",
    "the service",
    "the coffee",
    "the hotel",
    "the music",
    "the ending",
    "the price",
    "the bed",
]
POSITIVE = ["good", "great", "lovely", "excellent", "tasty", "friendly", "wonderful", "fast", "comfortable", "bright"]
NEGATIVE = ["bad", "awful", "terrible", "bland", "rude", "slow", "boring", "broken", "noisy", "dirty"]
INTENSIFIERS = ["", "", "very ", "really ", "quite ", "truly "]
FILLERS = [
    "",
    "",
    "we went there last week and ",
    "honestly ",
    "to be fair ",
    "after a long day ",
    "my friend told me that ",
    "i have to say ",
    "as expected ",
]
VERBS = ["was", "is", "felt", "seemed"]


def verdict(rng: random.Random) -> tuple[str, int]:
    """``"<aspect> <verb> [not] [intensifier]<adjective>"`` and its polarity (1 positive, 0 negative)."""
    positive = rng.random() < 0.5
    adjective = rng.choice(POSITIVE if positive else NEGATIVE)
    negated = rng.random() < 0.35
    words = (
        f"{rng.choice(ASPECTS)} {rng.choice(VERBS)} {'not ' if negated else ''}{rng.choice(INTENSIFIERS)}{adjective}"
    )
    return words, int(positive != negated)


def review(rng: random.Random) -> tuple[str, int]:
    first, label = verdict(rng)
    text = rng.choice(FILLERS) + first
    if rng.random() < 0.4:
        second, label = verdict(rng)  # the contrasting clause decides
        text += f" but {second}"
    return text, label


def write(path: Path, rows: list[tuple[str, int]]) -> None:
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["text", "label"])
        writer.writerows(rows)


def train_tokenizer(texts: list[str], directory: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    tokenizer.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials))
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
    ).save_pretrained(str(directory))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--labelled", type=int, default=2000)
    parser.add_argument("--unlabelled", type=int, default=10000)
    parser.add_argument("--val", type=int, default=1000)
    parser.add_argument("--test", type=int, default=2000)
    parser.add_argument("--vocab-size", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    labelled = [review(rng) for _ in range(args.labelled)]
    unlabelled = [(review(rng)[0], -1) for _ in range(args.unlabelled)]
    write(args.out / "train.csv", labelled + unlabelled)
    write(args.out / "val.csv", [review(rng) for _ in range(args.val)])
    write(args.out / "test.csv", [review(rng) for _ in range(args.test)])
    train_tokenizer([text for text, _ in labelled + unlabelled], args.out / "tokenizer", args.vocab_size)
    counts = f"{args.labelled} labelled + {args.unlabelled} unlabelled"
    print(f"wrote {args.out}: train.csv ({counts}), val.csv, test.csv, tokenizer/")


if __name__ == "__main__":
    main()
