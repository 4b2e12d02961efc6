"""Teachers and students from the model libraries people already use, built from YAML alone.

- :func:`timm_model`: any of timm's architectures (``timm.create_model``), the ``vision`` extra;
- :func:`torchvision_model`: torchvision's (``torchvision.models.get_model``), the ``vision`` extra;
- :func:`hf_image_classifier` / :func:`hf_sequence_classifier`: Hugging Face ``transformers`` models
  (``AutoModelForImageClassification`` / ``AutoModelForSequenceClassification``) from a local directory
  or built from a config, wrapped in :class:`HFClassifier` (forward returns logits).

Nothing is downloaded: weights come from local files only (``weights`` here, or ``teacher.checkpoint``);
the libraries' own switches that would download (timm's / torchvision's ``pretrained``, a torchvision weights
name such as ``DEFAULT``) are refused with one line naming that local alternative.
Feature taps name submodules as the library does; for the Hugging Face wrapper they start with ``model.``
(e.g. ``model.resnet.encoder.stages.2``). A misspelt architecture lists the nearest names the library has.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from kd_lightning.engine.errors import ConfigError, ModelConfigError
from kd_lightning.engine.weights import load_weights

KEY = "model"
#: A torchvision weights name (``DEFAULT``, ``IMAGENET1K_V1``, ``ResNet18_Weights.IMAGENET1K_V1``), not a file.
_WEIGHTS_NAME = re.compile(r"(\w+_Weights\.)?[A-Z][A-Z0-9_]*")


def _require(module: str, extra: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ModelConfigError(
            f"{{model}}._target_ builds a {module} model, but {module} cannot be imported ({error}); "
            f'pip install -e ".[{extra}]" (docs/install.md: optional extras)'
        ) from None


def _unknown(name: str, known: list[str], library: str) -> ConfigError:
    near = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
    return ModelConfigError(
        f"{{model}}.name={name!r} is not a {library} architecture; nearest: {near or sorted(known)[:5]}"
    )


def check_offline(library: str, kwargs: dict[str, Any], weights: Any) -> None:
    """Refuse what would ask ``library`` to download weights (its ``pretrained`` switch, a torchvision weights
    name as ``weights``) with the offline spelling; ``pretrained: false`` is dropped from ``kwargs`` (weights are
    never downloaded anyway). Checked before ``library`` is imported."""
    pretrained = kwargs.pop("pretrained", False)
    if pretrained is not None and pretrained is not False:
        raise ModelConfigError(
            f"{{model}}.pretrained={pretrained!r} asks {library} to download weights, which kd_lightning never "
            "does (no model hub here): save the weights to a local file elsewhere and set {weights}=<file> "
            "(.safetensors / .pt / .pth / .ckpt), or drop {model}.pretrained"
        )
    if weights is not None and not isinstance(weights, str | Path):
        raise ModelConfigError(
            f"{{model}}.weights={weights!r} must be the path of a local weights file, or null (no model hub here)"
        )
    if isinstance(weights, str) and _WEIGHTS_NAME.fullmatch(weights) and not Path(weights).exists():
        raise ModelConfigError(
            f"{{model}}.weights={weights} names downloadable {library} weights, not a file, and kd_lightning never "
            "downloads (no model hub here): save them to a local file elsewhere (e.g. torchvision's "
            "get_weight(...).get_state_dict()) and set {weights}=<file>"
        )


def _with_weights(model: nn.Module, weights: str | None, keep_mismatched: bool) -> nn.Module:
    if weights is not None:
        try:
            load_weights(model, weights, key="{model}.weights", keep_mismatched=keep_mismatched)
        except ConfigError as error:  # its keys named under the model's own node by build()
            raise ModelConfigError(str(error)) from None
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
    initial values (fine-tuning a pretrained backbone). ``pretrained: true`` is refused (nothing is downloaded:
    ``weights`` or ``teacher.checkpoint`` take a local file)."""
    check_offline("timm", kwargs, weights)
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
    :func:`timm_model`; a weights name (``DEFAULT``) or ``pretrained: true`` is refused as there."""
    check_offline("torchvision", kwargs, weights)
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
        #: The data's class order as indices of this model's classes (set by engine.class_names.align_classes
        #: when the model's id2label orders the same names differently); None: as the model has them.
        self.class_order: list[int] | None = None
        self._order_index: Tensor | None = None

    @property
    def class_names(self) -> list[str] | None:
        """The names of the model's classes in its own order (``config.id2label``), if it has them."""
        id2label = getattr(getattr(self.model, "config", None), "id2label", None)
        return [str(id2label[i]) for i in sorted(id2label, key=int)] if id2label else None

    def forward(self, x: Tensor | Mapping[str, Tensor]) -> Tensor:
        if isinstance(x, Mapping):
            inputs = {key: value for key, value in x.items() if key in self.accepted}
        elif "pixel_values" in self.accepted:
            inputs = {"pixel_values": x}
        else:
            inputs = {"input_ids": x}
        if not self.checked_ids and "input_ids" in inputs:
            self.check_vocabulary(inputs["input_ids"])
        logits = self.model(**inputs).logits
        if self.class_order is None:
            return logits
        if self._order_index is None or self._order_index.device != logits.device:
            self._order_index = torch.tensor(self.class_order, device=logits.device)
        return logits.index_select(-1, self._order_index)

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
        raise ModelConfigError(
            "{model}: give exactly one of path (a local directory saved with save_pretrained) or config "
            "(a model_type and its settings, e.g. {model_type: bert, hidden_size: 64, ...})"
        )
    if path is not None:
        if not Path(path).exists():
            raise ModelConfigError(
                f"{{model}}.path={path} does not exist; point it at a local directory saved with save_pretrained "
                "(nothing is downloaded)"
            )
        options = {"num_labels": num_classes, "local_files_only": True, **plain(pretrained_options or {})}
        check_saved_head(transformers, auto_class, path, num_classes, options)
        return HFClassifier(auto.from_pretrained(path, **options))
    settings = plain(config)
    model_type = settings.pop("model_type", None)
    if model_type is None:
        raise ModelConfigError("{model}.config needs a model_type (e.g. bert, vit, resnet)")
    check_head_settings(settings, num_classes)
    try:
        hf_config = transformers.AutoConfig.for_model(model_type, num_labels=num_classes, **settings)
    except ValueError as error:
        raise ModelConfigError(f"{{model}}.config.model_type={model_type!r}: {str(error).splitlines()[0]}") from None
    return HFClassifier(auto.from_config(hf_config))


#: ``from_pretrained`` options that also say where the saved config is.
_CONFIG_OPTIONS = ("subfolder", "revision", "gguf_file", "trust_remote_code")


def check_saved_head(transformers: Any, auto_class: str, path: str, num_classes: int, options: Mapping) -> None:
    """A saved classifier whose head has another class count than ``num_classes`` (``data.num_classes``) is
    refused naming both (transformers would stop with a load report instead), unless
    ``ignore_mismatched_sizes`` asks for a fresh head. A saved model without a classification head (a base
    model) gets a fresh one either way; a config that cannot be read is left to ``from_pretrained``."""
    if options.get("ignore_mismatched_sizes"):
        return
    try:
        where = {key: options[key] for key in _CONFIG_OPTIONS if key in options}
        saved = transformers.AutoConfig.from_pretrained(path, local_files_only=True, **where)
    except Exception:  # from_pretrained reports it
        return
    head = auto_class.removeprefix("AutoModel")  # ForSequenceClassification / ForImageClassification
    classifier = any(str(name).endswith(head) for name in getattr(saved, "architectures", None) or [])
    labels = getattr(saved, "num_labels", None)
    if classifier and labels is not None and labels != num_classes:
        raise ModelConfigError(
            f"{{model}}.path={path} has a classification head of {labels} classes, but {{model}}.num_classes="
            f"{num_classes} (data.num_classes); set data.num_classes={labels} if the data has {labels} classes, "
            "or give the model a fresh head of data.num_classes with {model}.pretrained_options."
            "ignore_mismatched_sizes=true (that head is untrained: fine-tune it before distilling)"
        )


def check_head_settings(settings: dict[str, Any], num_classes: int) -> None:
    """``config.num_labels`` / ``config.id2label`` agree with ``num_classes`` (``data.num_classes``), which sets
    the head's size; ``num_labels`` is then dropped (passed once, as ``num_classes``)."""
    labels = settings.pop("num_labels", num_classes)
    id2label = settings.get("id2label")
    if labels != num_classes or (id2label is not None and len(id2label) != num_classes):
        given = f"num_labels={labels}" if labels != num_classes else f"id2label of {len(id2label)} classes"
        raise ModelConfigError(
            f"{{model}}.config.{given}, but the head is sized by {{model}}.num_classes={num_classes} "
            f"(data.num_classes); drop {{model}}.config.num_labels / id2label or set data.num_classes to match"
        )


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
