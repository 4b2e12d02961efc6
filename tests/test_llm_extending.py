"""A new LM scheme from outside the package: one class (tests/outside/lm_scheme.py) plus one YAML in a config
directory of the user's own, run end to end through ``kd-llm-distill --config-dir DIR``, no library file touched."""

from __future__ import annotations

import json
from pathlib import Path

from tests.test_cli import run

SCHEME = """
_target_: tests.outside.lm_scheme.WarmStartOnPolicy
_partial_: true
warm_steps: 2
lmbda: 1.0
generation: {max_new_tokens: 6}
"""


def test_an_lm_scheme_from_outside_trains_end_to_end(kd_home: Path, tmp_path: Path) -> None:
    config_dir = tmp_path / "my_configs"
    (config_dir / "llm" / "method").mkdir(parents=True)
    (config_dir / "llm" / "method" / "warm_on_policy.yaml").write_text(SCHEME)
    run_dir = kd_home / "llm_outside"
    result = run(
        "kd-llm-distill",
        "--config-dir",
        str(config_dir),
        "llm/method=warm_on_policy",
        "llm/loss=jsd",
        "llm/teacher=tiny",
        "llm/student=tiny",
        "llm.data.train_prompts.num_prompts=16",
        "llm.data.val_prompts.num_prompts=4",
        "trainer.max_epochs=2",  # 16 prompts: 2 steps an epoch
        "+trainer.enable_progress_bar=false",
        f"hydra.run.dir={run_dir}",
        home=kd_home,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["details"]["method"] == "warm_on_policy"
    # the 2 steps of epoch 0 were the cross-entropy warm-up, both steps of epoch 1 sampled from the student
    assert summary["metrics"]["train/on_policy_steps"] == 2.0 and summary["metrics"]["train/loss_distill"] > 0
    assert summary["metrics"]["val/kl_to_teacher"] > 0 and summary["metrics"]["val/loss"] > 0
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
