"""Every training scheme (conf/method) with the rest of the product: sweeps and kd-sweep-report, W&B,
and exact resumption after a crash."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from kd_lightning.engine.weights import read_state_dict
from kd_lightning.recipes.distill import distill
from tests.conftest import SWEEP_JOB, TINY, compose_config
from tests.test_cli import run
from tests.test_wandb import offline_runs

SCHEMES = ["multi_teacher", "mutual", "born_again", "assistant_chain"]


@pytest.mark.slow  # ~15 s: every scheme is also run end to end by its own fast test
def test_a_sweep_over_schemes_runs_each_and_reports_them(kd_home: Path) -> None:
    sweep_dir = kd_home / "scheme_sweep"
    result = run(
        "kd-distill", "-m", f"method={','.join(SCHEMES)}", *SWEEP_JOB, f"hydra.sweep.dir={sweep_dir}", home=kd_home
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summaries = [json.loads(p.read_text()) for p in sorted(sweep_dir.glob("*/summary.json"))]
    targets = sorted(s["config"]["method"]["_target_"].rsplit(".", 1)[-1] for s in summaries)
    assert targets == ["AssistantChain", "BornAgain", "MultiTeacherDistillation", "MutualLearning"]
    assert all(0.0 <= s["metrics"]["val/acc_best"] <= 1.0 for s in summaries)
    report = run("kd-sweep-report", str(sweep_dir), home=kd_home)
    assert report.returncode == 0, report.stderr
    with (sweep_dir / "sweep_summary.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(row["method"] for row in rows) == sorted(SCHEMES) and {row["status"] for row in rows} == {"ok"}


def test_each_stage_of_a_multi_stage_run_is_its_own_wandb_run(
    tmp_path: Path, kd_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    overrides = [*TINY, "method=born_again", "method.generations=2", "logger=wandb", "compare_scratch=false"]
    summary = distill(compose_config(run_dir, [*overrides, "trainer.max_epochs=1"]))
    for row in summary["stages"]:
        (stage_run,) = offline_runs(run_dir / "stages" / row["stage"])
        assert stage_run.exit_code == 0 and stage_run.run.job_type == f"distill/{row['stage']}"
        assert stage_run.logged("test/acc")[-1] == pytest.approx(row["test_acc"])


@pytest.mark.parametrize("scheme", ["mutual", "multi_teacher"])
def test_a_scheme_that_crashed_resumes_to_exactly_the_uninterrupted_run(
    scheme: str, tmp_path: Path, kd_home: Path
) -> None:
    common = [*TINY, f"method={scheme}", "trainer.max_epochs=3", "trainer.deterministic=true", "logger=none"]
    common.append("compare_scratch=false")
    whole = distill(compose_config(tmp_path / "whole", common))
    fail = ["+callbacks.fail._target_=tests.custom_callbacks.FailInRunDir", "+callbacks.fail.run_dir=crashed"]
    with pytest.raises(RuntimeError, match="simulated crash"):
        distill(compose_config(tmp_path / "crashed", [*common, *fail, "+callbacks.fail.epoch=2"]))
    resumed = distill(compose_config(tmp_path / "crashed", [*common, "ckpt_path=last"]))
    for key in ("val/acc_best", "test/acc", "test/acc_last", "train/loss"):
        assert resumed["metrics"][key] == whole["metrics"][key], key
    # Every trainable model (the student, mutual learning's peers) is restored and ends identical.
    weights = [torch.load(Path(r["best_checkpoint"]), weights_only=True)["state_dict"] for r in (whole, resumed)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert read_state_dict(resumed["best_checkpoint"]).keys()  # the student loads as a model
