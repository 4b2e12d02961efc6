"""``kd-distill`` and ``kd-train`` end to end, as a user runs them (subprocesses)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY
from tests.warm_process import run_console_script

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]


def run(
    program: str, *overrides: str, home: Path, timeout: int = 300, fresh: bool = False
) -> subprocess.CompletedProcess:
    """Run a console script from ``home`` (``tests.*`` classes importable, as configs may name them), in its own
    process forked from the warm worker (:mod:`tests.warm_process`), or a fresh interpreter when ``fresh``."""
    env = {**os.environ, "KD_LIGHTNING_HOME": str(home), "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(REPO)}
    return run_console_script(program, list(overrides), env, home, timeout, fresh=fresh)


@pytest.fixture(scope="module")
def tiny_run(kd_home: Path) -> tuple[subprocess.CompletedProcess, Path]:
    run_dir = kd_home / "e2e_run"
    return run("kd-distill", *TINY, f"hydra.run.dir={run_dir}", home=kd_home), run_dir


def test_default_run_prints_summary_and_writes_outputs(tiny_run) -> None:
    result, run_dir = tiny_run
    assert result.returncode == 0, result.stderr[-3000:]
    for text in (
        "kd_lightning summary",
        "teacher test acc",
        "scratch student test acc",
        "KD gain over scratch",
        "compression",
        "wall time: total",
    ):
        assert text in result.stdout, text
    summary = json.loads((run_dir / "summary.json").read_text())
    metrics = summary["metrics"]
    for key in (
        "val/acc",
        "val/acc_best",
        "val/agreement",
        "val/kl_to_teacher",
        "test/acc",
        "teacher/val_acc",
        "teacher/test_acc",
        "train/loss",
        "train/loss_ce",
        "train/loss_kd",
    ):
        assert key in metrics, key
    assert summary["compression"] == pytest.approx(summary["teacher_params"] / summary["student_params"])
    assert summary["kd_gain"] == pytest.approx(metrics["test/acc"] - summary["scratch"]["test_acc"])
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert (run_dir / "summary.md").read_text().startswith("| quantity |")
    assert list((run_dir / "csv").rglob("metrics.csv"))


def test_second_run_reuses_cached_teacher_and_scratch(tiny_run, kd_home: Path) -> None:
    first, _ = tiny_run
    assert first.returncode == 0
    second_dir = kd_home / "e2e_second"
    result = run("kd-distill", *TINY, f"hydra.run.dir={second_dir}", home=kd_home)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((second_dir / "summary.json").read_text())
    assert summary["teacher_source"].startswith("cache")
    assert summary["seconds"]["teacher_fit"] == 0.0
    assert not (second_dir / "teacher").exists() and not (second_dir / "scratch").exists()


def test_existing_run_dir_is_never_overwritten(tiny_run, kd_home: Path) -> None:
    first, run_dir = tiny_run
    assert first.returncode == 0
    before = (run_dir / "summary.json").read_text()
    result = run("kd-distill", *TINY, f"hydra.run.dir={run_dir}", home=kd_home)
    assert result.returncode == 2
    assert "already holds a run" in result.stderr
    assert (run_dir / "summary.json").read_text() == before


# Slow: the default suite covers these classes of bad input (range, type, class counts, missing checkpoint) in
# tests/test_bad_inputs.py, as processes too; these four also pin the exact message wording.
@pytest.mark.slow
@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("loss.alpha=1.5", r"loss\.alpha=1\.5 is outside \[0, 1\]"),
        ("loss.temperature=0", r"loss\.temperature=0(\.0)? must be > 0"),
        ("teacher.model.num_classes=5", r"teacher\.model outputs 5 classes but data\.num_classes=10"),
        ("teacher.checkpoint=/no/such/teacher.ckpt", r"teacher\.checkpoint=/no/such/teacher\.ckpt does not exist"),
    ],
)
def test_bad_input_stops_before_training_with_one_line(override: str, expected: str, kd_home: Path) -> None:
    run_dir = kd_home / f"bad_{re.sub(r'[^a-z]', '_', override)}"
    result = run("kd-distill", *TINY, override, f"hydra.run.dir={run_dir}", home=kd_home)
    assert result.returncode == 2
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("kd-distill: error:")]
    assert len(error_lines) == 1 and re.search(expected, error_lines[0]), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not (run_dir / "checkpoints").exists()


def test_unknown_group_option_lists_the_choices(kd_home: Path) -> None:
    result = run("kd-distill", "loss=no_such_loss", home=kd_home)
    assert result.returncode != 0
    assert "Could not find 'loss/no_such_loss'" in result.stderr
    assert "Available options in 'loss'" in result.stderr and "kd" in result.stderr


def test_kd_train_then_distill_from_its_checkpoint(kd_home: Path) -> None:
    train_dir = kd_home / "teacher_run"
    trained = run(
        "kd-train",
        "teacher.fit.max_epochs=2",
        "+trainer.enable_progress_bar=false",
        f"hydra.run.dir={train_dir}",
        home=kd_home,
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    checkpoint = re.search(r"^checkpoint: (\S+)$", trained.stdout, re.MULTILINE).group(1)
    assert Path(checkpoint).is_file() and Path(checkpoint).parent == train_dir / "checkpoints"
    printed = re.search(r"^distill from it with: (.+)$", trained.stdout, re.MULTILINE).group(1)
    assert printed == f"kd-distill data=mnist1d teacher=cnn1d teacher.checkpoint={checkpoint}"

    distill_dir = kd_home / "from_checkpoint"
    result = run(
        "kd-distill",
        *TINY,
        f"teacher.checkpoint={checkpoint}",
        "compare_scratch=false",
        f"hydra.run.dir={distill_dir}",
        home=kd_home,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((distill_dir / "summary.json").read_text())
    assert summary["teacher_source"] == f"checkpoint {checkpoint}"
    assert summary["scratch"] is None
