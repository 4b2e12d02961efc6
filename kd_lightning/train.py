"""``kd-distill`` (``python -m kd_lightning.train``): distill the configured teacher into a student."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from kd_lightning.cli import CONFIG_DIR, exit_on_config_error
from kd_lightning.errors import ConfigError
from kd_lightning.runner import distill


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="distill")
def main(cfg: DictConfig) -> float:
    """Run one distillation job and return ``optimized_metric`` (for sweepers)."""
    summary = exit_on_config_error(distill, cfg, "kd-distill")
    metrics = summary["metrics"]
    if cfg.optimized_metric not in metrics:
        raise ConfigError(f"optimized_metric={cfg.optimized_metric} was not logged; pick one of {sorted(metrics)}")
    return metrics[cfg.optimized_metric]


if __name__ == "__main__":
    main()
