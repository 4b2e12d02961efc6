"""A run stopped by SIGTERM (preemption, a SLURM time limit) exits 143 with one line, writes no summary, and the
same command with ckpt_path=auto finishes it: requeue-on-failure fires and nothing looks like success."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.test_cli import BIN, REPO

LM = [
    "llm/teacher=tiny",
    "llm/student=tiny",
    "llm.data.train_prompts.num_prompts=64",
    "llm.data.val_prompts.num_prompts=4",
    "trainer.max_epochs=3",
    "+trainer.enable_progress_bar=false",
    "logger=none",
]
CLASSIFIER = ["trainer.max_epochs=6", "teacher.fit.max_epochs=1", "data.transfer_samples=2000"]
CLASSIFIER += ["compare_scratch=false", "logger=none", "+trainer.enable_progress_bar=false", "trainer.accelerator=cpu"]


def start(program: str, args: list[str], home: Path) -> subprocess.Popen:
    env = {**os.environ, "KD_LIGHTNING_HOME": str(home), "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [str(BIN / program), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=home
    )


@pytest.mark.parametrize(("program", "args"), [("kd-llm-distill", LM), ("kd-distill", CLASSIFIER)], ids=["lm", "kd"])
def test_sigterm_exits_143_and_auto_resumes(program: str, args: list[str], kd_home: Path) -> None:
    run_dir = kd_home / "sigterm" / program
    last = run_dir / "checkpoints" / "last.ckpt"
    process = start(program, [*args, f"hydra.run.dir={run_dir}"], kd_home)
    deadline = time.monotonic() + 180
    while not last.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # the first epoch's checkpoint: training is under way
    assert process.poll() is None, "the run ended before it could be interrupted"
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith(f"{program}: interrupted by SIGTERM")]
    assert len(lines) == 1 and "ckpt_path=auto" in lines[0] and "Traceback" not in err
    assert last.exists() and not (run_dir / "summary.json").exists()
    resumed = start(program, [*args, "ckpt_path=auto", f"hydra.run.dir={run_dir}"], kd_home)
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-2000:]
    assert json.loads((run_dir / "summary.json").read_text())["metrics"]
