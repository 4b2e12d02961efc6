"""What a run or a sweep reports: summaries, W&B tracking, calibration, sweep tables and plots.

Its modules are imported directly; this ``__init__`` imports none of them, so that writing a summary does
not load matplotlib. ``__all__`` names the modules:

- ``summary``: the end-of-run summary (``summary.json`` / ``summary.md``); ``markdown``: sections of
  markdown files that several scripts write into;
- ``tracking``: Weights & Biases runs, one per job, grouped per sweep; ``calibration``: expected calibration
  error and the reliability diagram; ``teacher_cost``: each teacher's forward time and memory per step;
- ``sweep_report``: ``kd-sweep-report``'s table; ``sweep_plots``, ``sweep_heatmap``, ``sweep_drawing``: its
  figures; ``sweep_hint``: where a ``-m`` sweep's jobs went and the command that tabulates them.
"""

__all__ = [
    "calibration",
    "markdown",
    "summary",
    "sweep_drawing",
    "sweep_heatmap",
    "sweep_hint",
    "sweep_plots",
    "sweep_report",
    "teacher_cost",
    "tracking",
]
