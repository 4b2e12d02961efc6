"""``kd-llm-generate``: teacher completions of the configured prompts, written (resumably) to a JSON Lines file."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from kd_lightning.cli.common import CONFIG_DIR, exit_on_config_error


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="llm_generate")
def main(cfg: DictConfig) -> None:
    """Generate (or finish generating) the teacher completions file."""
    from kd_lightning.llm.generation import run  # here: ``--help`` skips torch/transformers

    exit_on_config_error(run, cfg, "kd-llm-generate")


if __name__ == "__main__":
    main()
