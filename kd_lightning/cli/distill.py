"""``kd-distill`` (``python -m kd_lightning.cli.distill``): train the configured method (default: KD of the
teacher into the student) and report it."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from kd_lightning.cli.common import CONFIG_DIR, run_for_sweeper
from kd_lightning.cli.renamed import CLASSIFIER_RENAMED, exit_on_renamed


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="distill")
def main(cfg: DictConfig) -> float:
    """Run one distillation job and return ``optimized_metric`` (for sweepers)."""
    from kd_lightning.recipes.distill import distill  # here: ``--help`` and config errors skip torch/Lightning

    return run_for_sweeper(distill, cfg, "kd-distill")


def entry() -> None:
    """The console script: old spellings get one line naming the new one, then Hydra composes the run."""
    exit_on_renamed("kd-distill", sys.argv[1:], CLASSIFIER_RENAMED)
    main()


if __name__ == "__main__":
    entry()
