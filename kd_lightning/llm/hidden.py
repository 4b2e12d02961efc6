"""Hidden-state distillation for causal LMs (``conf/llm/hidden``): a weighted term beside any token loss."""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.engine.errors import ConfigError, check_positive
from kd_lightning.engine.taps import Taps

DISTANCES = ("mse", "cosine")
KEY = "llm.hidden.layers"


def decoder_depth(model: nn.Module) -> int:
    """The number of decoder blocks of a Hugging Face causal LM (``get_decoder().layers``)."""
    return len(model.get_decoder().layers)


def uniform_map(student_layers: int, teacher_layers: int) -> dict[int, int]:
    """Student layer ``i`` (1-based) -> teacher layer ``round(i * L_t / L_s)`` (halves up): the last to the last."""
    return {i: max(1, int(i * teacher_layers / student_layers + 0.5)) for i in range(1, student_layers + 1)}


def layer_path(model: nn.Module, index: int) -> str:
    """The dotted module path whose output is ``output_hidden_states[index]`` (1-based): decoder block
    ``index - 1``, or, for the last block, the decoder's final norm (Hugging Face's last hidden state)."""
    decoder = model.get_decoder()
    module = decoder.norm if index == len(decoder.layers) else decoder.layers[index - 1]
    return next(name for name, candidate in model.named_modules() if candidate is module)


def check_hidden_support(scheme: str, takes: bool, cached: bool, remote: bool, cross_tokenizer: bool) -> None:
    """Refuse ``llm/hidden`` where scheme ``scheme`` (``takes``: whether it may) cannot read one live
    teacher's hidden states at the student's token positions."""
    off = "or set llm/hidden=none"
    if not takes:
        raise ConfigError(f"llm/hidden is not supported by llm/method={scheme}: use token_kd or on_policy, {off}")
    if cached or remote:
        where = "llm/teacher_cache" if cached else "a remote llm/teacher"
        raise ConfigError(
            f"llm/hidden reads the teacher's decoder layers, which {where} does not keep: set "
            f"llm/teacher_cache=none with a local llm/teacher, {off}"
        )
    if cross_tokenizer:
        raise ConfigError(f"llm/hidden compares positions of one tokenization; llm/loss=uld / gold pair two: {off}")


class HiddenStateLoss(nn.Module):
    r"""Distance between the student's and the teacher's hidden states at mapped decoder layers.

    .. math::
        H = \frac{1}{|M|} \sum_{(s, t) \in M} \frac{1}{|P|} \sum_{i \in P} d\big(W_s h^{S}_{s,i},\ h^{T}_{t,i}\big)

    over the pairs ``M`` of ``layers`` (student layer -> teacher layer, 1-based: layer ``i`` is
    ``output_hidden_states[i]`` of Hugging Face, the last one after the final norm) and the non-padded
    tokens ``P`` (``attention_mask``), prompt included; ``d`` is ``mse`` (mean over the hidden dimension of
    the squared difference) or ``cosine`` (``1 - cos``). ``W_s``: a learned ``nn.Linear`` without bias
    (student width -> teacher width; FitNets' regressor, Romero et al. 2015; TinyBERT, Jiao et al. 2020)
    when the widths differ, else the identity; it trains with the student and is saved in its checkpoints.
    The scheme adds ``weight * H`` per token to its token loss (``train/loss_hidden`` logs ``H``).

    Args:
        layers: ``{student layer: teacher layer}``, or ``uniform`` (every student layer ``i`` -> teacher
            layer ``round(i * L_t / L_s)``).
        distance: ``mse`` or ``cosine``.
        weight: the term's weight (> 0) beside the token loss.
    """

    def __init__(self, layers: Mapping[int, int] | str = "uniform", distance: str = "mse", weight: float = 1.0):
        super().__init__()
        if distance not in DISTANCES:
            raise ConfigError(f"llm.hidden.distance={distance!r} must be one of {list(DISTANCES)}")
        check_positive(weight, "llm.hidden.weight", " (llm/hidden=none turns the term off)")
        if isinstance(layers, str) and layers != "uniform":
            raise ConfigError(f"{KEY}={layers!r}: give a map {{student layer: teacher layer}} or 'uniform'")
        if not isinstance(layers, str) and not (isinstance(layers, Mapping) and layers):
            raise ConfigError(f"{KEY}={layers!r}: give a non-empty map {{student layer: teacher layer}} or 'uniform'")
        self.layers = layers if isinstance(layers, str) else {int(s): int(t) for s, t in layers.items()}
        self.distance, self.weight = distance, float(weight)
        self.pairs: list[tuple[int, int]] = []
        self.projections = nn.ModuleDict()
        self.taps: dict[str, Taps] = {}
        self.paths: dict[int, tuple[str, str]] = {}  # student layer -> (student path, teacher path)

    def bind(self, student: nn.Module, teacher: nn.Module) -> None:
        """Resolve the layer map on the two models (refused if out of range), make the projections and the
        taps (forward hooks on the mapped layers; nothing is kept outside :meth:`capture`)."""
        depth_s, depth_t = decoder_depth(student), decoder_depth(teacher)
        pairs = uniform_map(depth_s, depth_t) if isinstance(self.layers, str) else self.layers
        for s, t in pairs.items():
            if not (1 <= s <= depth_s and 1 <= t <= depth_t):
                raise ConfigError(
                    f"{KEY}: {s}: {t} is out of range: student layers are 1..{depth_s} (llm.student), teacher "
                    f"layers 1..{depth_t} (llm.teacher); or set {KEY}=uniform"
                )
        self.pairs = sorted(pairs.items())
        width_s, width_t = student.config.hidden_size, teacher.config.hidden_size
        for s, _ in self.pairs:
            self.projections[str(s)] = nn.Linear(width_s, width_t, bias=False) if width_s != width_t else nn.Identity()
        for name, model, side in (("student", student, 0), ("teacher", teacher, 1)):
            paths = {layer_path(model, pair[side]): KEY for pair in self.pairs}
            self.taps[name] = Taps(model, paths)
        self.paths = {s: (layer_path(student, s), layer_path(teacher, t)) for s, t in self.pairs}

    def capture(self, side: str) -> AbstractContextManager[dict[str, Tensor]]:
        """``with loss.capture("student") as states:`` around that model's forward fills ``states``."""
        return self.taps[side].capture()

    def forward(self, student: Mapping[str, Tensor], teacher: Mapping[str, Tensor], attention_mask: Tensor) -> Tensor:
        """``H`` (a scalar, at least float32) from the captured states (path -> ``[B, T, H]``) over attended tokens."""
        valid = attention_mask.bool()
        tokens = valid.sum().clamp(min=1)
        terms = []
        for s, _ in self.pairs:
            path_s, path_t = self.paths[s]
            if path_s not in student or path_t not in teacher:
                raise RuntimeError(f"{KEY}: layer {s}'s states were not captured (the models ran outside capture)")
            projection = self.projections[str(s)]
            source = student[path_s][valid]
            if isinstance(projection, nn.Linear):
                source = projection(source.to(projection.weight.dtype))
            dtype = torch.promote_types(source.dtype, torch.float32)  # at least float32
            source, target = source.to(dtype), teacher[path_t][valid].to(dtype)
            if self.distance == "mse":
                per_token = (source - target).pow(2).mean(dim=-1)
            else:
                per_token = 1.0 - F.cosine_similarity(source, target, dim=-1)
            terms.append(per_token.sum() / tokens)
        return torch.stack(terms).mean()

    def add_to(self, out: Any, student: Mapping[str, Tensor], teacher: Mapping[str, Tensor], mask: Tensor) -> Any:
        """A token loss's output (sums over ``out.count`` tokens) plus ``weight * H`` per token; ``H`` per
        token in ``out.parts["hidden"]`` (logged as ``train/loss_hidden``)."""
        term = self(student, teacher, mask)
        count = out.count.to(term.dtype)
        parts = {**out.parts, "hidden": term.detach() * count}
        return out._replace(total=out.total + self.weight * term * count, parts=parts)
