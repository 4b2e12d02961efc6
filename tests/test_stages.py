"""Multi-stage methods: born-again generations, teacher-assistant chains and FitNets' two stages, one run per
stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kd_lightning.engine.errors import ConfigError
from kd_lightning.engine.weights import read_state_dict
from kd_lightning.methods.stages import Stage
from kd_lightning.recipes.distill import distill
from kd_lightning.recipes.finished_run import Run
from kd_lightning.recipes.stages import ensemble_accuracy
from tests.conftest import TINY, compose_config

BORN_AGAIN = [*TINY, "method=born_again", "logger=none", "trainer.deterministic=true"]


def stage_summary(run: Path, stage: str) -> dict:
    return json.loads((run / "stages" / stage / "summary.json").read_text())


def test_born_again_trains_g_generations_each_taught_by_the_one_before(tmp_path: Path, kd_home: Path) -> None:
    run = tmp_path / "run"
    summary = distill(compose_config(run, BORN_AGAIN))
    names = [row["stage"] for row in summary["stages"]]
    assert names == ["generation_0", "generation_1", "generation_2"]
    for name in names:  # each generation: its own run with its own best checkpoint
        assert Path(stage_summary(run, name)["best_checkpoint"]).is_file()
    # Generation 0 is the scratch student: the same run as the independently computed baseline.
    generation_0 = stage_summary(run, "generation_0")
    assert generation_0["config"]["method"]["_target_"] == "kd_lightning.methods.Supervised"
    assert generation_0["metrics"]["test/acc"] == summary["scratch"]["test_acc"]
    assert generation_0["metrics"]["val/acc_best"] == summary["scratch"]["val_acc_best"]
    # Generation k's teacher is generation k - 1's best checkpoint, of the same architecture.
    for k in (1, 2):
        teacher = stage_summary(run, f"generation_{k}")["config"]["method"]["teachers"]["teacher"]
        assert teacher["checkpoint"] == stage_summary(run, f"generation_{k - 1}")["best_checkpoint"]
        assert teacher["model"] == generation_0["config"]["student"]["model"]
    # The run's result is the last generation's; the ensemble metric is there too.
    assert summary["metrics"]["test/acc"] == stage_summary(run, "generation_2")["metrics"]["test/acc"]
    assert 0.0 < summary["metrics"]["test/acc_ensemble"] <= 1.0
    assert json.loads((run / "summary.json").read_text())["stages"] == summary["stages"]
    assert "stage generation_1 test acc" in (run / "summary.md").read_text()
    # A one-model ensemble is that model: ensemble_accuracy agrees with Lightning's test pass.
    cfg = compose_config(run, BORN_AGAIN)
    only = Stage("generation_2", cfg.method.each, cfg.student.model)
    assert ensemble_accuracy(cfg, [only], {"generation_2": stage_summary(run, "generation_2")}) == pytest.approx(
        summary["metrics"]["test/acc"], abs=1e-6
    )


def test_a_chain_that_crashed_mid_stage_resumes_keeping_finished_stages(tmp_path: Path, kd_home: Path) -> None:
    common = [*BORN_AGAIN, "method.generations=2", "compare_scratch=false"]
    whole = distill(compose_config(tmp_path / "whole", common))
    crashed = tmp_path / "crashed"
    fail = ["+callbacks.fail._target_=tests.custom_callbacks.FailInRunDir", "+callbacks.fail.run_dir=generation_1"]
    with pytest.raises(RuntimeError, match="simulated crash"):
        distill(compose_config(crashed, [*common, *fail, "+callbacks.fail.epoch=1"]))
    finished = (crashed / "stages" / "generation_0" / "summary.json").read_bytes()
    assert not (crashed / "stages" / "generation_1" / "summary.json").exists()
    with pytest.raises(ConfigError, match="already holds a run"):  # not resuming: refused, nothing touched
        distill(compose_config(crashed, common))
    resumed = distill(compose_config(crashed, [*common, "ckpt_path=last"]))
    assert (crashed / "stages" / "generation_0" / "summary.json").read_bytes() == finished  # kept as it was
    for key in ("test/acc", "test/acc_last", "val/acc_best", "test/acc_ensemble"):
        assert resumed["metrics"][key] == whole["metrics"][key], key
    weights = [read_state_dict(r["best_checkpoint"]) for r in (whole, resumed)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    again = distill(compose_config(crashed, [*common, "ckpt_path=auto"]))  # finished: returned as it is
    assert again["metrics"] == resumed["metrics"]


def test_assistant_chain_runs_teacher_assistant_student(tmp_path: Path, kd_home: Path) -> None:
    run = tmp_path / "run"
    summary = distill(compose_config(run, [*TINY, "method=assistant_chain", "logger=none", "compare_scratch=false"]))
    assert [row["stage"] for row in summary["stages"]] == ["assistant", "student"]
    assistant, student = stage_summary(run, "assistant"), stage_summary(run, "student")
    # The assistant is taught by the configured teacher (trained and cached like any KD teacher) ...
    assert assistant["config"]["method"]["teachers"]["teacher"]["model"] == assistant["config"]["teacher"]["model"]
    assert assistant["config"]["student"]["model"]["channels"] == 16
    # ... and the student by the assistant's best checkpoint.
    teacher = student["config"]["method"]["teachers"]["teacher"]
    assert teacher["checkpoint"] == assistant["best_checkpoint"]
    assert teacher["model"] == assistant["config"]["student"]["model"]
    assert summary["student_params"] == student["student_params"] == 4810
    assert summary["teacher_params"] == assistant["student_params"]
    assert summary["metrics"]["test/acc"] == student["metrics"]["test/acc"]
    # kd-report of the chain reports its student: the last stage's run.
    assert Run.read(run).run_dir == run / "stages" / "student"


FITNETS = [
    *TINY,
    "method=fitnets_two_stage",
    "method.hint_epochs=2",
    "trainer.max_epochs=1",
    "loss=fitnet",
    "student=cnn1d_narrow",
    "+loss.terms.kd._target_=kd_lightning.losses.KLDivergence",
    "loss.alpha=0.6",
    "+loss.weights.kd=2.0",
    "logger=none",
    "compare_scratch=false",
]


def test_fitnets_two_stage_trains_the_hint_alone_then_the_loss_from_that_student(tmp_path: Path, kd_home: Path) -> None:
    """(Moved from the HintPreStage callback's test.) Stage ``hint``: alpha 1, every term but the hint weighted 0,
    for ``hint_epochs``; stage ``distill``: the configured loss, its student starting from the hint stage's final
    weights (not a fresh initialisation), its regressor new."""
    run, record = tmp_path / "run", tmp_path / "loss.jsonl"
    callback = ["+callbacks.record._target_=tests.custom_callbacks.RecordLoss", f"+callbacks.record.path={record}"]
    summary = distill(compose_config(run, [*FITNETS, *callback]))
    assert [row["stage"] for row in summary["stages"]] == ["hint", "distill"]
    seen = [tuple(row[2:]) for row in map(json.loads, record.read_text().splitlines())]
    stages = [tuple(row[:2]) for row in map(json.loads, record.read_text().splitlines())]
    assert seen == [(1.0, {"fitnet": 1.0, "kd": 0.0})] * 2 + [(0.6, {"fitnet": 1.0, "kd": 2.0})]
    assert stages == [("hint", 0), ("hint", 1), ("distill", 0)]
    hint, second = stage_summary(run, "hint"), stage_summary(run, "distill")
    last = Path(hint["best_checkpoint"]).with_name("last.ckpt")
    assert second["config"]["student"]["checkpoint"] == str(last)
    assert "checkpoint" not in hint["config"]["student"]
    final = {k.removeprefix("student."): v for k, v in read_state_dict(last).items() if k.startswith("student.")}
    started = torch.load(f"{record}.distill.pt")
    assert started.keys() == final.keys() and all(torch.equal(started[k], final[k]) for k in final)
    fresh = torch.load(f"{record}.hint.pt")
    assert not all(torch.equal(fresh[k], final[k]) for k in final)  # the hint stage trained the student
    assert summary["metrics"]["test/acc"] == second["metrics"]["test/acc"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["method=fitnets_two_stage"], r"method\.hint='fitnet' is not a term of the loss \(loss\.terms: \['kd'\]\)"),
        (["method=fitnets_two_stage", "loss=fitnet", "method.hint_epochs=0"], "method.hint_epochs=0 must be"),
        (["method=born_again", "method.generations=1"], "method.generations=1: born-again needs at least 2"),
        (["method=assistant_chain", "method.assistants=null"], "method.assistants is empty"),
        (["method=born_again", "ckpt_path=/tmp/x.ckpt"], "a multi-stage run resumes as a whole"),
        (["method=born_again", "ckpt_path=last"], "holds no stages to resume"),
        # A loss the last stage's model cannot serve fails before the first stage trains.
        (["method=assistant_chain", "loss=fitnet"], "stage student of method=AssistantChain: loss.terms.fitnet"),
        (["method=assistant_chain", "+method.assistants.student=${student.model}"], "stage names must differ"),
    ],
)
def test_bad_multi_stage_configs_are_refused_before_training(
    tmp_path: Path, kd_home: Path, overrides: list[str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        distill(compose_config(tmp_path / "run", [*TINY, *overrides]))
    assert not (tmp_path / "run" / "stages").exists()


def test_a_stage_whose_teacher_checkpoint_is_gone_is_refused(tmp_path: Path, kd_home: Path) -> None:
    common = [*BORN_AGAIN, "method.generations=2", "compare_scratch=false"]
    run = tmp_path / "run"
    fail = ["+callbacks.fail._target_=tests.custom_callbacks.FailInRunDir", "+callbacks.fail.run_dir=generation_1"]
    with pytest.raises(RuntimeError, match="simulated crash"):
        distill(compose_config(run, [*common, *fail, "+callbacks.fail.epoch=0"]))
    Path(stage_summary(run, "generation_0")["best_checkpoint"]).unlink()
    with pytest.raises(ConfigError, match="stage generation_1 distils from stage generation_0, whose best checkpoint"):
        distill(compose_config(run, [*common, "ckpt_path=last"]))


def test_a_stage_whose_starting_student_was_not_saved_is_refused(tmp_path: Path, kd_home: Path) -> None:
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match="stage distill starts from the student of stage hint, whose last checkpoint"):
        distill(compose_config(run, [*FITNETS, "callbacks.model_checkpoint.save_last=false"]))
    assert (run / "stages" / "hint" / "summary.json").is_file() and not (run / "stages" / "distill").exists()
