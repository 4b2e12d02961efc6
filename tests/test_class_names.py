"""Classes that line up (issue 34, class 3): a model whose id2label orders the data's class names differently
is reordered into the data's order; other names are refused in one line; a teacher that guesses on the
validation split is a warning naming the likely causes."""

from __future__ import annotations

import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from kd_lightning.engine.class_names import align_classes, data_class_names, model_class_names
from kd_lightning.engine.errors import ConfigError

TINY_BERT = {"model_type": "bert", "vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 1}
TINY_BERT |= {"num_attention_heads": 2, "intermediate_size": 32}


def bert(id2label: dict[int, str] | None, tmp_path: Path):
    """A tiny Hugging Face classifier saved with ``id2label`` (as a user's fine-tuned teacher is), loaded as the
    library loads a teacher directory."""
    pytest.importorskip("transformers")
    from kd_lightning.models.external import hf_sequence_classifier

    config = {**TINY_BERT, **({"id2label": id2label} if id2label else {})}
    hf_sequence_classifier(num_classes=3, config=config).model.save_pretrained(tmp_path / "teacher")
    return hf_sequence_classifier(num_classes=3, path=str(tmp_path / "teacher"), config=None)


def test_a_permuted_id2label_is_reordered_into_the_data_order(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model = bert({0: "positive", 1: "negative", 2: "neutral"}, tmp_path).eval()
    ids = {"input_ids": torch.randint(0, 50, (4, 7))}
    before = model(ids)
    data = ["negative", "neutral", "positive"]  # string labels numbered in sorted order
    with caplog.at_level("INFO"):
        align_classes({"teacher": model}, data)
    after = model(ids)
    # data class j is the model's class order[j]: negative = model's 1, neutral = 2, positive = 0
    assert model.class_order == [1, 2, 0]
    torch.testing.assert_close(after, before[:, [1, 2, 0]], rtol=0, atol=0)
    assert "reordered to the data's order" in caplog.text
    align_classes({"teacher": model}, [name.upper() for name in data])  # case aside, the same order now
    assert model.class_order == [1, 2, 0]


def test_other_class_names_are_refused_in_one_line_and_unnamed_classes_are_not_compared(tmp_path: Path) -> None:
    model = bert({0: "pos", 1: "neg", 2: "neutral"}, tmp_path)
    with pytest.raises(ConfigError) as error:
        align_classes({"teacher": model}, ["negative", "neutral", "positive"])
    message = str(error.value)
    assert "\n" not in message and message.startswith("teacher.model names its classes ['pos', 'neg', 'neutral']")
    assert "['negative', 'neutral', 'positive']" in message
    unnamed = bert(None, tmp_path / "unnamed")  # transformers' LABEL_0, LABEL_1, ...
    assert model_class_names(unnamed) is None
    align_classes({"teacher": unnamed}, ["negative", "neutral", "positive"])
    assert unnamed.class_order is None
    align_classes({"teacher": model}, None)  # data without names (MNIST-1D)
    assert model.class_order is None


def test_data_class_names_come_from_label_or_folder_names() -> None:
    assert data_class_names(SimpleNamespace(label_names=("neg", "pos"))) == ["neg", "pos"]
    assert data_class_names(SimpleNamespace(class_names=["cat", "dog"])) == ["cat", "dog"]
    assert data_class_names(SimpleNamespace(label_names=("0", "1"))) is None  # plain integer labels name nothing
    assert data_class_names(SimpleNamespace()) is None


@pytest.mark.parametrize(("accuracy", "warned"), [(0.36, True), (0.40, False)])
def test_a_teacher_at_chance_level_is_a_warning_naming_the_causes(accuracy: float, warned: bool) -> None:
    from torchmetrics.classification import MulticlassAccuracy

    from kd_lightning.callbacks import ChanceTeacherWarning

    guard = ChanceTeacherWarning()
    module = SimpleNamespace(teacher_val_acc=MulticlassAccuracy(3))
    trainer = SimpleNamespace(sanity_checking=False, callback_metrics={"teacher/val_acc": torch.tensor(accuracy)})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        guard.on_validation_end(trainer, module)
        guard.on_validation_end(trainer, module)  # once per fit
    messages = [str(w.message) for w in caught]
    assert len(messages) == int(warned)
    if warned:
        assert "chance level for 3 classes" in messages[0] and "id2label" in messages[0]
        assert "teacher.input" in messages[0]
