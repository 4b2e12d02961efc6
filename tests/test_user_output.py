"""What a user sees: where the run went, quiet logs, progress lines without a terminal, full paths."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from kd_lightning.engine.checks import check_class_counts
from kd_lightning.engine.errors import ConfigError
from kd_lightning.models import MLP
from tests.conftest import TINY
from tests.test_cli import run


@pytest.fixture(scope="module")
def piped_run(tmp_path_factory: pytest.TempPathFactory):
    home = tmp_path_factory.mktemp("fresh_home")  # a fresh home: the teacher is trained, as a new user's is
    run_dir = home / "run"
    overrides = [o for o in TINY if "enable_progress_bar" not in o]  # the default: no bar setting at all
    # in-epoch progress lines after every batch (default: at most every 30 s)
    overrides.append("callbacks.epoch_lines.interval_s=0.000001")
    # a fresh interpreter: what a user sees includes what importing the libraries prints
    return run("kd-distill", *overrides, f"hydra.run.dir={run_dir}", home=home, fresh=True), run_dir


def test_the_run_directory_is_printed_at_the_start_and_the_end(piped_run) -> None:
    result, run_dir = piped_run
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0] == f"kd_lightning: run directory: {run_dir}"
    assert any(line.startswith(f"kd_lightning: results: {run_dir}") and "kd-report" in line for line in lines)


def test_without_a_terminal_each_epoch_prints_one_line_and_no_bar(piped_run) -> None:
    result, _ = piped_run
    epochs = re.findall(
        r"^(teacher|distill|scratch) epoch (\d)/2  train/loss [\d.]+  val/acc [\d.]+", result.stdout, re.M
    )
    assert epochs == [(fit, n) for fit in ("teacher", "distill", "scratch") for n in ("1", "2")]
    assert re.search(r"^distill epoch 1/2 .*val/agreement [\d.]+  [\d.]+ s$", result.stdout, re.M)
    before_summary = result.stdout.split("kd_lightning summary")[0]
    assert "━" not in before_summary and "it/s" not in result.stdout  # no progress bar


def test_without_a_terminal_long_epochs_print_progress_lines_with_etas(piped_run) -> None:
    """With a short ``callbacks.epoch_lines.interval_s`` every fit (teacher, distill, scratch) prints lines
    inside its epochs: step / total, samples/s and the epoch's and the run's remaining time."""
    result, _ = piped_run
    step = (
        r"^(teacher|distill|scratch) epoch (\d)/2  step (\d+)/(\d+)  [\d,]+ samples/s  epoch ETA \d+ s  run ETA \d+ s$"
    )
    lines = re.findall(step, result.stdout, re.M)
    assert {(fit, epoch) for fit, epoch, _, _ in lines} == {
        (f, n) for f in ("teacher", "distill", "scratch") for n in "12"
    }
    for fit in ("teacher", "distill", "scratch"):
        steps = [(int(epoch), int(done), int(total)) for f, epoch, done, total in lines if f == fit]
        assert steps == sorted(steps) and all(1 <= done <= total for _, done, total in steps), fit
        assert steps[-1][1] == steps[-1][2]  # the last batch of the last epoch


def test_a_default_run_prints_no_third_party_notices(piped_run) -> None:
    result, _ = piped_run
    stderr = [line for line in result.stderr.splitlines() if line.strip()]
    tested = [line for line in stderr if line.startswith("Restoring states from the checkpoint path at ")]
    assert len(tested) == 3  # which checkpoint each test pass used (teacher, student, scratch), once each
    assert [line for line in stderr if line not in tested] == []  # no litlogger tip, accelerators, seeds, pytree
    for notice in ("litlogger", "LeafSpec", "Seed set to", "GPU available"):
        assert notice not in result.stdout


def test_the_summary_shows_paths_in_full_and_the_scratch_time(piped_run) -> None:
    result, _ = piped_run
    assert "…" not in result.stdout
    table = "".join(line.strip("│ ") for line in result.stdout.splitlines() if "│" in line)
    assert "model.safetensors" in table and "wall time: scratch fit" in result.stdout


def test_the_class_count_error_names_the_models_own_argument() -> None:
    import torch

    class Net(torch.nn.Module):
        def __init__(self, classes: int) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(40, classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x.flatten(1))

    config = OmegaConf.create({"_target_": "my.Net", "classes": 3})
    with pytest.raises(ConfigError, match=r"set student\.model\.classes=10 "):
        check_class_counts(torch.zeros(2, 1, 40), 10, {"student": Net(3)}, {"student": config})
    with pytest.raises(ConfigError, match=r"set teacher\.model\.num_classes=10 "):  # no config: the usual name
        check_class_counts(torch.zeros(2, 1, 40), 10, {"teacher": MLP(num_classes=4)})


def test_a_home_that_is_a_file_is_one_line(tmp_path: Path) -> None:
    home = tmp_path / "not_a_dir"
    home.write_text("")
    import os
    import subprocess
    import sys

    env = {**os.environ, "KD_LIGHTNING_HOME": str(home)}
    result = subprocess.run(
        [str(Path(sys.executable).parent / "kd-distill")], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"kd-distill: error: paths.home={home} is inside a file ({home}), not a directory; set KD_LIGHTNING_HOME "
        "to a writable directory"
    ]


def test_kd_report_says_the_thread_count_and_warns_on_a_busy_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    import torch

    from kd_lightning.recipes import report

    measured = report.Measured(accuracy=0.9, ece=0.05, params=10, size_bytes=1024, latency_s=0.001)
    latency_row = report.rows({"student": measured}, None, batch_size=32, repeats=5)[-1]
    assert f"{torch.get_num_threads()} threads" in latency_row[0]
    monkeypatch.setattr(os, "getloadavg", lambda: (0.2, 0.2, 0.2))
    assert report.machine_load() is None
    monkeypatch.setattr(os, "getloadavg", lambda: (64.0, 64.0, 64.0))
    warning = report.machine_load()
    assert warning is not None and "load average 64.0" in warning and "not reliable" in warning


def test_progress_durations_read_as_a_person_reads_them_and_a_bad_interval_names_its_key() -> None:
    from kd_lightning.callbacks.progress import EpochLines, batch_rows, duration

    assert [duration(s) for s in (0.4, 42, 600, 3 * 3600 + 300)] == ["0 s", "42 s", "10 min", "3 h 05 min"]
    assert batch_rows({"ids": torch.zeros(8, 3), "n": 1}) == 8 and batch_rows((torch.tensor(1.0),)) is None
    with pytest.raises(ConfigError, match=r"callbacks\.epoch_lines\.interval_s=-1: use seconds >= 0"):
        EpochLines(interval_s=-1)
