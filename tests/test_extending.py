"""Adding a method, a loss term, a model and a dataset from outside the package: one class plus one YAML
each, in a config directory of the user's own (``kd-distill --config-dir DIR``), no library file touched."""

from __future__ import annotations

import json
import math
from pathlib import Path

from tests.test_cli import run

EXT = "tests.outside.toy_extensions"

CONFIGS = {
    "method/two_teacher_mean.yaml": f"""
_target_: {EXT}.TwoTeacherMean
_partial_: true
teachers:
  teacher: ${{teacher}}
  teacher_1:
    model:
      _target_: {EXT}.ToyMLP
      in_features: 8
      hidden: 16
      classes: ${{data.num_classes}}
    checkpoint: null
    fit:
      max_epochs: 3
      optimizer: {{_target_: torch.optim.Adam, _partial_: true, lr: 0.01}}
""",
    "loss/cosine.yaml": f"""
_target_: kd_lightning.losses.DistillationLoss
alpha: 0.5
label_smoothing: 0.0
terms:
  cosine: {{_target_: {EXT}.CosineLogits}}
""",
    "teacher/toy_mlp.yaml": f"""
model:
  _target_: {EXT}.ToyMLP
  in_features: 8
  hidden: 64
  classes: ${{data.num_classes}}
checkpoint: null
fit:
  max_epochs: 3
  optimizer: {{_target_: torch.optim.Adam, _partial_: true, lr: 0.01}}
""",
    "student/toy_mlp.yaml": f"""
model:
  _target_: {EXT}.ToyMLP
  in_features: 8
  hidden: 4
  classes: ${{data.num_classes}}
""",
    "data/blobs.yaml": f"""
_target_: {EXT}.Blobs
num_classes: 3
features: 8
batch_size: 64
""",
}


def test_a_method_loss_model_and_dataset_from_outside_run_through_kd_distill(tmp_path: Path) -> None:
    config_dir = tmp_path / "my_configs"
    for name, text in CONFIGS.items():
        (config_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (config_dir / name).write_text(text.lstrip())
    run_dir = tmp_path / "run"
    result = run(
        "kd-distill",
        "--config-dir",
        str(config_dir),
        "method=two_teacher_mean",
        "loss=cosine",
        "teacher=toy_mlp",
        "student=toy_mlp",
        "data=blobs",
        "trainer.max_epochs=10",
        "optimizer.lr=0.03",
        "trainer.accelerator=cpu",
        "compare_scratch=false",
        "logger=none",
        "+trainer.enable_progress_bar=false",
        f"hydra.run.dir={run_dir}",
        home=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["config"]["method"]["_target_"] == f"{EXT}.TwoTeacherMean"
    metrics = summary["metrics"]
    assert all(math.isfinite(value) for value in metrics.values())
    assert "train/loss_cosine" in metrics
    assert metrics["test/acc"] > 0.6 and metrics["teacher/test_acc"] > 0.9  # 3 well-separated blobs
    # Both teachers were trained (each with its own fit recipe) and left out of the checkpoint.
    assert summary["teacher_params"] == (8 * 64 + 64 + 64 * 3 + 3) + (8 * 16 + 16 + 16 * 3 + 3)
    assert (run_dir / "teacher" / "checkpoints").is_dir() and (run_dir / "teacher_1" / "checkpoints").is_dir()
