"""What each command does top to bottom, from a composed config; the entry points of :mod:`kd_lightning.cli`
call these.

Its modules are imported directly; this ``__init__`` imports none of them, so that one command does not
load another's dependencies (ONNX, transformers). ``__all__`` names the modules:

- ``distill``: ``kd-distill``; ``stages``: a multi-stage method, one kd-distill run per stage;
  ``components``: the pieces a method is assembled from; ``preflight``: the checks before any training;
  ``placement``: where a run's teacher outputs come from; ``teacher``: obtain, train or cache a teacher
  (``kd-train``); ``fit``: supervised fits and test passes;
- ``report``: ``kd-report``, with ``deployed`` (its rows for kd-export's files) and ``finished_run`` (a
  finished run as kd-report and kd-export read it);
- ``export``: ``kd-export``, with ``export_hf`` (a Hugging Face directory), ``export_manifest`` (the files
  it wrote) and ``quantize`` (int8 through ONNX Runtime);
- ``llm_distill``: ``kd-llm-distill``, with ``llm_components`` (scheme, teachers, tokenizers),
  ``llm_preflight`` (its checks before training) and ``llm_bug_checks`` (known KD bugs on one batch).
"""

__all__ = [
    "components",
    "deployed",
    "distill",
    "export",
    "export_hf",
    "export_manifest",
    "finished_run",
    "fit",
    "llm_bug_checks",
    "llm_components",
    "llm_distill",
    "llm_preflight",
    "placement",
    "preflight",
    "quantize",
    "report",
    "stages",
    "teacher",
]
