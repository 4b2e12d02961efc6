"""``kd-llm-distill`` (``python -m kd_lightning.cli.llm_distill``): distil a causal-LM teacher into a student."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from kd_lightning.cli.common import CONFIG_DIR, run_for_sweeper
from kd_lightning.cli.renamed import LLM_RENAMED, exit_on_renamed


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="llm_distill")
def main(cfg: DictConfig) -> float:
    """Run one LM distillation job and return ``optimized_metric`` (for sweepers)."""
    from kd_lightning.recipes.llm_distill import distill  # here: ``--help`` skips torch/Lightning/transformers

    return run_for_sweeper(distill, cfg, "kd-llm-distill")


def entry() -> None:
    """The console script: old spellings get one line naming the new one, then Hydra composes the run."""
    exit_on_renamed("kd-llm-distill", sys.argv[1:], LLM_RENAMED)
    main()


if __name__ == "__main__":
    entry()
