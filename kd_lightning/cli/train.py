"""``kd-train`` (``python -m kd_lightning.cli.train``): supervised training of a teacher (or any
model), with the teacher config's fit recipe; prints the checkpoint to distill from."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from kd_lightning.cli.common import CONFIG_DIR, exit_on_config_error
from kd_lightning.cli.renamed import CLASSIFIER_RENAMED, exit_on_renamed


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float:
    from kd_lightning.recipes.teacher import train_model  # here: ``--help`` skips torch/Lightning

    return exit_on_config_error(train_model, cfg, "kd-train")


def entry() -> None:
    """The console script: old spellings get one line naming the new one, then Hydra composes the run."""
    exit_on_renamed("kd-train", sys.argv[1:], CLASSIFIER_RENAMED)
    main()


if __name__ == "__main__":
    entry()
