"""``kd-distill`` (``python -m kd_lightning.cli.distill``): train the configured method (default: KD of the
teacher into the student) and report it."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from kd_lightning.cli.common import CONFIG_DIR, run_for_sweeper


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="distill")
def main(cfg: DictConfig) -> float:
    """Run one distillation job and return ``optimized_metric`` (for sweepers)."""
    from kd_lightning.recipes.distill import distill  # here: ``--help`` and config errors skip torch/Lightning

    return run_for_sweeper(distill, cfg, "kd-distill")


if __name__ == "__main__":
    main()
