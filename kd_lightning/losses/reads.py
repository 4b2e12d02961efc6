"""What a distillation term reads: a model by name, one of its layers, and that layer's output or input.

A term's two arguments are each given by a :class:`Read`, e.g. in YAML::

    student: {model: student, layer: features.3}         # the output of student.features[3]
    teacher: {model: teacher, layer: fc, io: input}      # what teacher.fc receives: penultimate features

``layer: logits`` (the default) is the model's own output. Outputs of every model are collected by
name (``{"student": {...}, "teacher": {...}, "teacher_1": {...}}``) and routed to the terms, so a
term never knows which side of which method it is on (torchdistill's hooks by module path).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from kd_lightning.engine.errors import ConfigError

LOGITS = "logits"
IO = ("output", "input")


@dataclass(frozen=True)
class Read:
    """One tensor a term reads: ``model``'s ``layer`` (dotted module path, or ``logits``), its ``io``.

    ``field`` is where the term's config names it (``student_layer``, ``teacher.layer``, ...), for errors.
    """

    model: str
    layer: str = LOGITS
    io: str = "output"
    field: str = ""

    def __post_init__(self) -> None:
        if self.io not in IO:
            raise ConfigError(f"{self.field or 'io'}: io={self.io!r}; use output or input")
        if self.layer == LOGITS and self.io == "input":
            raise ConfigError(f"{self.field or 'layer'}: the logits have no input; name the layer whose input to read")

    @property
    def key(self) -> str:
        """The name of this tensor among its model's outputs: the layer path, ``<path>:input`` for inputs."""
        return self.layer if self.io == "output" else f"{self.layer}:input"

    @property
    def is_layer(self) -> bool:
        return self.layer != LOGITS


ReadSpec = Mapping[str, Any] | None


def read_of(spec: ReadSpec, side: str, layer: str = LOGITS, layer_field: str | None = None) -> Read:
    """The :class:`Read` of a term argument: ``spec`` (``{model, layer, io}``, each optional) or, without it,
    the shorthand ``layer`` of the model named ``side``."""
    if spec is None:
        return Read(side, layer, "output", layer_field or side)
    unknown = sorted(set(spec) - {"model", "layer", "io"})
    if unknown:
        raise ConfigError(f"{side}: unknown keys {unknown}; a read takes model, layer and io")
    if layer != LOGITS and "layer" in spec:
        raise ConfigError(f"{side}.layer and {layer_field} both name a layer; keep one")
    return Read(
        str(spec.get("model", side)),
        str(spec.get("layer", layer)),
        str(spec.get("io", "output")),
        f"{side}.layer" if "layer" in spec else (layer_field or side),
    )


def reads_of(spec: ReadSpec, side: str, layers: Sequence[str], layers_field: str) -> tuple[Read, ...]:
    """One :class:`Read` per layer of ``layers`` (a multi-layer term), all of ``spec``'s model and io."""
    spec = dict(spec or {})
    if "layer" in spec:
        raise ConfigError(f"{side}.layer: a multi-layer term takes its layers from {layers_field}")
    return tuple(
        Read(str(spec.get("model", side)), path, str(spec.get("io", "output")), f"{layers_field}[{i}]")
        for i, path in enumerate(layers)
    )


Routing = Read | tuple[Read, ...]


def routed(outputs: Mapping[str, Mapping[str, Tensor]], routing: Routing) -> Tensor | list[Tensor]:
    """The tensor (or, for several reads, the list of tensors) ``routing`` names in ``outputs``."""
    if isinstance(routing, Read):
        return outputs[routing.model][routing.key]
    return [outputs[read.model][read.key] for read in routing]


def as_tuple(routing: Routing) -> tuple[Read, ...]:
    return (routing,) if isinstance(routing, Read) else routing
