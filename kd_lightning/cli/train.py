"""``kd-train`` (``python -m kd_lightning.cli.train``): supervised training of a teacher (or any
model), with the teacher config's fit recipe; prints the checkpoint to distill from."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from kd_lightning.cli.common import CONFIG_DIR, exit_on_config_error


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float:
    from kd_lightning.recipes.teacher import train_model  # here: ``--help`` skips torch/Lightning

    return exit_on_config_error(train_model, cfg, "kd-train")


if __name__ == "__main__":
    main()
