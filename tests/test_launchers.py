"""Hydra launchers: submitit's local executor runs a 2-job sweep (each job its own process and run
dir); the SLURM launcher config composes with the trainer's devices and nodes."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from kd_lightning.cli.common import CONFIG_DIR
from tests.conftest import SWEEP_JOB
from tests.test_cli import run

pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="needs the sweep extra")


def test_submitit_local_runs_a_two_job_sweep(kd_home: Path) -> None:
    sweep_dir = kd_home / "submitit_sweep"
    result = run(
        "kd-distill",
        "-m",
        "hydra/launcher=local",
        "seed=0,1",
        *SWEEP_JOB,
        f"hydra.sweep.dir={sweep_dir}",
        home=kd_home,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(list(sweep_dir.glob("*/summary.json"))) == 2
    assert list((sweep_dir / ".submitit").iterdir())


def test_slurm_launcher_takes_tasks_and_nodes_from_the_trainer() -> None:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            "distill",
            overrides=["hydra/launcher=slurm", "trainer.devices=4", "trainer.num_nodes=2"],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.tasks_per_node, launcher.gpus_per_node, launcher.nodes) == (4, 4, 2)
