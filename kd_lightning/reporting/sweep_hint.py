"""At the end of a ``-m`` sweep: where its jobs went, and the command that tabulates them."""

from __future__ import annotations

from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


class SweepDirectoryHint(Callback):
    """A Hydra callback (``conf/hydra/default.yaml``) printing the sweep directory when a multirun starts
    (one job directory each, ``<job>/summary.json``) and the ``kd-sweep-report`` command once every job has
    finished (Hydra skips the end of a sweep some job of which failed; the start line is printed anyway)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        print(f"kd_lightning: sweep directory: {config.hydra.sweep.dir} (one directory per job)", flush=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = config.hydra.sweep.dir
        print(f"kd_lightning: sweep finished: {sweep_dir}; table and plot: kd-sweep-report {sweep_dir}", flush=True)
