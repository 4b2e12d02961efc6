"""The pieces every layer above shares; imports nothing else of kd_lightning.

Its modules are imported directly (``from kd_lightning.engine.errors import ConfigError``); this ``__init__``
imports none of them, so that a light module (``errors``, ``multirun``) does not pull torch in. ``__all__``
names the modules:

- ``errors``: :class:`~kd_lightning.engine.errors.ConfigError` and the one-line value checks;
- ``batches``: inputs that are a tensor or a mapping of tensors; ``taps``: intermediate outputs by module
  path; ``adapters``: connectors from a student feature to a teacher feature's shape;
- ``runtime``: teacher precision, memory format, compilation, validation-output reuse; ``threads``: the
  ``cpu_threads`` option; ``nonfinite``: the non-finite loss check read every N steps;
- ``instantiate``: building from config nodes (trainer, loggers, parameter counts); ``trusted``: what a
  file may instantiate; ``resolvers``: OmegaConf resolvers; ``quiet``: silenced third-party notices;
- ``run_dir``: resume, one run per directory; ``resume``: what a checkpoint carries for an exact resume;
  ``checkpointing``: checkpoints without frozen models; ``weights``: loading and freezing weights;
- ``checks``: checks that need no training; ``class_names``: models that name their classes;
  ``metrics``: which way a metric improves; ``multirun``: whether this process is a multirun job;
- ``caching``: the content-addressed store every cache uses (``caching.store``).
"""

__all__ = [
    "adapters",
    "batches",
    "caching",
    "checkpointing",
    "checks",
    "class_names",
    "errors",
    "instantiate",
    "metrics",
    "multirun",
    "nonfinite",
    "quiet",
    "resolvers",
    "resume",
    "run_dir",
    "runtime",
    "taps",
    "threads",
    "trusted",
    "weights",
]
