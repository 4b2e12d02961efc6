"""Teachers and students from the model libraries people already use, built from YAML alone.

- :func:`timm_model`: any of timm's architectures (``timm.create_model``), the ``vision`` extra;
- :func:`torchvision_model`: torchvision's (``torchvision.models.get_model``), the ``vision`` extra;
- :func:`hf_image_classifier` / :func:`hf_sequence_classifier`: Hugging Face ``transformers`` models
  (``AutoModelForImageClassification`` / ``AutoModelForSequenceClassification``) from a local directory
  or built from a config, wrapped in :class:`HFClassifier` (forward returns logits).

Nothing is downloaded: weights come from local files only (``weights`` here, or ``teacher.checkpoint``).
Feature taps name submodules as the library does; for the Hugging Face wrapper they start with ``model.``
(e.g. ``model.resnet.encoder.stages.2``). A misspelt architecture lists the nearest names the library has.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from kd_lightning.engine.errors import ConfigError
from kd_lightning.engine.weights import load_weights

KEY = "model"


def _require(module: str, extra: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ConfigError(
            f"{KEY}._target_ builds a {module} model, but {module} cannot be imported ({error}); "
            f'pip install -e ".[{extra}]" (docs/install.md: optional extras)'
        ) from None


def _unknown(name: str, known: list[str], library: str) -> ConfigError:
    near = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
    return ConfigError(f"{KEY}.name={name!r} is not a {library} architecture; nearest: {near or sorted(known)[:5]}")


def _with_weights(model: nn.Module, weights: str | None, keep_mismatched: bool) -> nn.Module:
    if weights is not None:
        load_weights(model, weights, key=f"{KEY}.weights", keep_mismatched=keep_mismatched)
    return model


def timm_model(
    name: str,
    num_classes: int,
    in_chans: int = 3,
    weights: str | None = None,
    keep_mismatched: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """``timm.create_model(name, pretrained=False, num_classes=..., in_chans=..., **kwargs)`` (Wightman 2019,
    pytorch-image-models), then ``weights`` (a local .safetensors / .pt / .pth / .ckpt file, e.g. timm's
    ``model.safetensors``) loaded into it; ``keep_mismatched``: a head of another class count keeps its
    initial values (fine-tuning a pretrained backbone)."""
    timm = _require("timm", "vision")
    if name not in timm.list_models():
        raise _unknown(name, timm.list_models(), "timm")
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)
    return _with_weights(model, weights, keep_mismatched)


def torchvision_model(
    name: str, num_classes: int, weights: str | None = None, keep_mismatched: bool = False, **kwargs: Any
) -> nn.Module:
    """``torchvision.models.get_model(name, weights=None, num_classes=..., **kwargs)`` (Marcel & Rodriguez
    2010, TorchVision), then ``weights`` (a local state_dict file) loaded into it; ``keep_mismatched`` as in
    :func:`timm_model`."""
    models = _require("torchvision.models", "vision")
    known = models.list_models()
    if name not in known:
        raise _unknown(name, known, "torchvision")
    model = models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    return _with_weights(model, weights, keep_mismatched)


class HFClassifier(nn.Module):
    """A Hugging Face ``*ForImageClassification`` / ``*ForSequenceClassification`` model whose forward returns
    the logits tensor kd_lightning's losses read.

    Inputs: an image batch ``(B, C, H, W)`` (passed as ``pixel_values``), or a tokenised text batch: a mapping
    with ``input_ids`` and optionally ``attention_mask`` / ``token_type_ids`` (other keys, e.g. a teacher's own
    ``teacher_*`` tokenisation, are not this model's and are ignored), or a tensor of ``input_ids``.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.accepted = set(inspect.signature(model.forward).parameters)
        self.checked_ids = False

    def forward(self, x: Tensor | Mapping[str, Tensor]) -> Tensor:
        if isinstance(x, Mapping):
            inputs = {key: value for key, value in x.items() if key in self.accepted}
        elif "pixel_values" in self.accepted:
            inputs = {"pixel_values": x}
        else:
            inputs = {"input_ids": x}
        if not self.checked_ids and "input_ids" in inputs:
            self.check_vocabulary(inputs["input_ids"])
        return self.model(**inputs).logits

    def check_vocabulary(self, ids: Tensor) -> None:
        """Once (the first batch, checked before training): token ids must fit the model's embedding table, else
        a clear error instead of an index error inside the embedding."""
        rows = self.model.get_input_embeddings().num_embeddings
        largest = int(ids.max())
        if largest >= rows:
            raise ConfigError(
                f"{KEY}.config.vocab_size: the model embeds {rows} token ids but the batch has id {largest}; set "
                "vocab_size to the tokenizer's vocabulary size (len(tokenizer)) or use the tokenizer it was trained on"
            )
        self.checked_ids = True


def plain(mapping: Mapping[str, Any]) -> dict[str, Any]:
    """A config mapping as plain Python containers (Hugging Face configs validate list types)."""
    return OmegaConf.to_container(mapping, resolve=True) if isinstance(mapping, DictConfig) else dict(mapping)


def _hf_model(
    auto_class: str,
    num_classes: int,
    path: str | None,
    config: Mapping[str, Any] | None,
    pretrained_options: Mapping[str, Any] | None,
) -> HFClassifier:
    transformers = _require("transformers", "text")
    auto = getattr(transformers, auto_class)
    if (path is None) == (config is None):
        raise ConfigError(
            f"{KEY}: give exactly one of path (a local directory saved with save_pretrained) or config "
            "(a model_type and its settings, e.g. {model_type: bert, hidden_size: 64, ...})"
        )
    if path is not None:
        if not Path(path).exists():
            raise ConfigError(
                f"{KEY}.path={path} does not exist; point it at a local directory saved with save_pretrained "
                "(nothing is downloaded)"
            )
        options = {"num_labels": num_classes, "local_files_only": True, **plain(pretrained_options or {})}
        return HFClassifier(auto.from_pretrained(path, **options))
    settings = plain(config)
    model_type = settings.pop("model_type", None)
    if model_type is None:
        raise ConfigError(f"{KEY}.config needs a model_type (e.g. bert, vit, resnet)")
    try:
        hf_config = transformers.AutoConfig.for_model(model_type, num_labels=num_classes, **settings)
    except ValueError as error:
        raise ConfigError(f"{KEY}.config.model_type={model_type!r}: {str(error).splitlines()[0]}") from None
    return HFClassifier(auto.from_config(hf_config))


def hf_image_classifier(
    num_classes: int,
    path: str | None = None,
    config: Mapping[str, Any] | None = None,
    pretrained_options: Mapping[str, Any] | None = None,
) -> HFClassifier:
    """``AutoModelForImageClassification`` (Wolf et al. 2020) from the local directory ``path`` or built from
    ``config`` (``model_type`` plus its settings), with ``num_labels = num_classes``. ``pretrained_options``
    go to ``from_pretrained`` (e.g. ``ignore_mismatched_sizes: true`` for a head of another class count)."""
    return _hf_model("AutoModelForImageClassification", num_classes, path, config, pretrained_options)


def hf_sequence_classifier(
    num_classes: int,
    path: str | None = None,
    config: Mapping[str, Any] | None = None,
    pretrained_options: Mapping[str, Any] | None = None,
) -> HFClassifier:
    """``AutoModelForSequenceClassification`` (Wolf et al. 2020) from the local directory ``path`` or built
    from ``config``, with ``num_labels = num_classes``; ``pretrained_options`` as in
    :func:`hf_image_classifier` (e.g. ``gguf_file`` to read a GGUF checkpoint)."""
    return _hf_model("AutoModelForSequenceClassification", num_classes, path, config, pretrained_options)
