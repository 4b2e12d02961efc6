"""hparams_search=optuna: a seeded TPE study over temperature x alpha in SQLite that resumes."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import SWEEP_JOB
from tests.test_cli import run

optuna = pytest.importorskip("optuna", reason="needs the sweep extra: pip install -e '.[sweep]'")

TINY_SEARCH = [
    "hparams_search=optuna",
    "hydra.sweeper.n_trials=2",
    "hydra.sweeper.sampler.n_startup_trials=1",
    "hydra.sweeper.study_name=tiny",
    *SWEEP_JOB,
]


def test_optuna_study_runs_and_resumes(kd_home: Path) -> None:
    for attempt in range(2):
        result = run("kd-distill", *TINY_SEARCH, f"hydra.sweep.dir={kd_home / f'optuna_{attempt}'}", home=kd_home)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "Best value" in result.stdout + result.stderr
        sweep_dir = kd_home / f"optuna_{attempt}"
        assert (
            f"kd_lightning: sweep finished: {sweep_dir}; table and plot: kd-sweep-report {sweep_dir}" in result.stdout
        )
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{kd_home}/optuna.db")
    trials = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(trials) == 4  # the second search continued the same study
    for trial in trials:
        assert 1.0 <= trial.params["loss.temperature"] <= 8.0 and 0.1 <= trial.params["loss.alpha"] <= 1.0
        assert 0.0 <= trial.value <= 1.0
