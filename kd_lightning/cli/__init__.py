"""The console entry points, one module each, thin wrappers over :mod:`kd_lightning.recipes`.

Imported directly (``python -m kd_lightning.cli.<module>`` or the console script); this ``__init__`` imports
none of them, so that starting one command does not load the others. ``__all__`` names the modules:

- ``common``: where the configs are, one-line errors, the value returned to sweepers;
- ``distill``: ``kd-distill``; ``train``: ``kd-train``; ``report``: ``kd-report``; ``export``: ``kd-export``;
  ``sweep_report``: ``kd-sweep-report``;
- ``llm_distill``: ``kd-llm-distill``; ``llm_generate``: ``kd-llm-generate``;
- ``renamed``: command-line spellings that changed, each answered with the new one.
"""

__all__ = [
    "common",
    "distill",
    "export",
    "llm_distill",
    "llm_generate",
    "renamed",
    "report",
    "sweep_report",
    "train",
]
