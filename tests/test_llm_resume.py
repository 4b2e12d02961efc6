"""kd-llm-distill runs killed with SIGKILL resume (``ckpt_path=last``) to exactly the uninterrupted run, for
off-policy, on-policy, cached-teacher and routed multi-teacher schemes; a checkpoint of another teacher is
refused unless ``allow_other_teacher=true``."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch

from tests.test_cli import run

TINY_LM = [
    "llm/teacher=tiny",
    "llm/student=tiny",
    "llm.data.train_prompts.num_prompts=16",
    "llm.data.val_prompts.num_prompts=4",
    "trainer.max_epochs=3",
    "trainer.deterministic=true",
    "+trainer.enable_progress_bar=false",
    "logger=none",
]
KILL = ["+callbacks.kill._target_=tests.custom_callbacks.KillAtEpoch", "+callbacks.kill.epoch=2"]
MODES = {
    "token_kd": [],
    "on_policy": ["llm/method=on_policy", "llm/loss=jsd", "llm.method.lmbda=0.5",
                  "llm.method.generation.max_new_tokens=6"],
    "teacher_cache": ["llm/teacher_cache=top_k", "llm.teacher_cache.top_k=8"],
    "routed": ["llm/method=multi_teacher", "llm/teacher=routed_tiny", "llm.method.lmbda=0.5",
               "llm.method.generation.max_new_tokens=6"],
}  # fmt: skip


def checkpoint(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)


def student_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    state = checkpoint(run_dir)["state_dict"]
    return {name: value for name, value in state.items() if name.startswith("student.")}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_a_killed_lm_run_resumes_to_exactly_the_uninterrupted_run(mode: str, kd_home: Path) -> None:
    common = [*TINY_LM, *MODES[mode]]
    whole, killed = kd_home / "llm_resume" / mode / "whole", kd_home / "llm_resume" / mode / "killed"
    done = run("kd-llm-distill", *common, f"hydra.run.dir={whole}", home=kd_home)
    assert done.returncode == 0, done.stderr[-3000:]
    crashed = run("kd-llm-distill", *common, *KILL, f"hydra.run.dir={killed}", home=kd_home)
    assert crashed.returncode == -signal.SIGKILL and not (killed / "summary.json").exists()
    assert checkpoint(killed)["epoch"] == 1  # the end of epoch 1
    resumed = run("kd-llm-distill", *common, "ckpt_path=last", f"hydra.run.dir={killed}", home=kd_home)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected, got = student_weights(whole), student_weights(killed)
    assert expected and expected.keys() == got.keys()
    assert all(torch.equal(expected[name], got[name]) for name in expected), mode


def test_resuming_with_another_teacher_is_refused_unless_allowed(kd_home: Path) -> None:
    run_dir = kd_home / "llm_resume" / "other_teacher"
    common = [*TINY_LM[:-4], "trainer.max_epochs=1", "+trainer.enable_progress_bar=false", "logger=none"]
    first = run("kd-llm-distill", *common, f"hydra.run.dir={run_dir}", home=kd_home)
    assert first.returncode == 0, first.stderr[-3000:]
    other = [*common, "trainer.max_epochs=2", "llm.teacher.model.seed=7", "ckpt_path=last", f"hydra.run.dir={run_dir}"]
    refused = run("kd-llm-distill", *other, home=kd_home)
    assert refused.returncode == 2 and "allow_other_teacher" in refused.stderr and "Traceback" not in refused.stderr
    assert checkpoint(run_dir)["epoch"] == 0  # untouched
    allowed = run("kd-llm-distill", *other, "allow_other_teacher=true", home=kd_home)
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    assert checkpoint(run_dir)["epoch"] == 1
