"""``kd-train`` (``python -m kd_lightning.train_model``): supervised training of a teacher (or any
model), with the teacher config's fit recipe; prints the checkpoint to distill from."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from kd_lightning.cli import CONFIG_DIR, exit_on_config_error
from kd_lightning.runner import build, check_class_counts, check_run_dir, train_teacher

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> float:
    out_dir = Path(cfg.paths.output_dir)
    check_run_dir(out_dir, resuming=False)
    L.seed_everything(cfg.seed, workers=True)
    model = build(cfg.teacher.model, "teacher.model")
    check_class_counts(build(cfg.data, "data").example_input(), cfg.data.num_classes, teacher=model)
    result = train_teacher(cfg, model, out_dir)
    teacher_choice = HydraConfig.get().runtime.choices["teacher"]
    print(
        f"kd-train: val acc (best) {100 * result.val_acc_best:.2f}%, test acc {100 * result.test_acc:.2f}% "
        f"in {result.seconds:.1f} s\ncheckpoint: {result.best_checkpoint}\n"
        f"distill from it with: kd-distill teacher={teacher_choice} teacher.checkpoint={result.best_checkpoint}"
    )
    return result.val_acc_best


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float:
    return exit_on_config_error(train, cfg, "kd-train")


if __name__ == "__main__":
    main()
