"""ckpt_path=last / auto: resuming a run directory continues training instead of refusing it."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.conftest import TINY
from tests.test_cli import run

NO_SCRATCH = [*TINY, "compare_scratch=false"]


def last_epoch(run_dir: Path) -> int:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["epoch"]


def test_resume_last_continues_training(kd_home: Path) -> None:
    run_dir = kd_home / "resumable"
    first = run("kd-distill", *NO_SCRATCH, "trainer.max_epochs=1", f"hydra.run.dir={run_dir}", home=kd_home)
    assert first.returncode == 0, first.stderr[-3000:]
    assert last_epoch(run_dir) == 0
    resumed = run(
        "kd-distill", *NO_SCRATCH, "trainer.max_epochs=2", "ckpt_path=last", f"hydra.run.dir={run_dir}", home=kd_home
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Restoring states from the checkpoint path" in resumed.stdout + resumed.stderr
    assert last_epoch(run_dir) == 1  # 0-based: the second epoch ran


def test_auto_starts_fresh_and_last_without_checkpoint_is_a_one_line_error(kd_home: Path) -> None:
    fresh = kd_home / "auto_fresh"
    started = run(
        "kd-distill", *NO_SCRATCH, "trainer.max_epochs=1", "ckpt_path=auto", f"hydra.run.dir={fresh}", home=kd_home
    )
    assert started.returncode == 0, started.stderr[-3000:]
    missing = run("kd-distill", *NO_SCRATCH, "ckpt_path=last", f"hydra.run.dir={kd_home / 'never_ran'}", home=kd_home)
    assert missing.returncode == 2
    assert "kd-distill: error: ckpt_path=last:" in missing.stderr and "does not exist" in missing.stderr
