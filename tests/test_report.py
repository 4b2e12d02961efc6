"""``kd-report RUN_DIR`` on a tiny real run: the numbers agree with the run's own test metrics, ECE agrees
with an independent computation, the report files are written, and a directory that is not a finished
run stops with one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from kd_lightning.cli.report import main
from kd_lightning.recipes.distill import distill
from kd_lightning.recipes.finished_run import RunDirError
from kd_lightning.recipes.report import report
from kd_lightning.reporting.calibration import N_BINS, ReliabilityBins, expected_calibration_error
from tests.conftest import TINY, compose_config
from tests.test_cli import run


@pytest.fixture(scope="module")
def finished_run(kd_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("report") / "run"
    distill(compose_config(run_dir, [*TINY, "trainer.max_epochs=1", "compare_scratch=false", "logger=none"]))
    return run_dir


def test_report_matches_the_run_and_writes_markdown_and_diagram(finished_run: Path) -> None:
    summary = json.loads((finished_run / "summary.json").read_text())
    threads = torch.get_num_threads()
    try:
        numbers = report(finished_run, batch_size=32, repeats=3, warmup=1, cpu_threads=2)
    finally:
        torch.set_num_threads(threads)
    teacher, student = numbers["teacher"], numbers["student"]
    # Same checkpoint, same test split: the accuracies the run logged.
    assert student["accuracy"] == pytest.approx(summary["metrics"]["test/acc"], abs=1e-6)
    assert teacher["accuracy"] == pytest.approx(summary["metrics"]["teacher/test_acc"], abs=1e-6)
    assert (student["params"], teacher["params"]) == (summary["student_params"], summary["teacher_params"])
    for model in (teacher, student):
        assert 0.0 <= model["ece"] <= 1.0 and model["latency_s"] > 0
        assert 4 * model["params"] <= model["size_bytes"] <= 4 * model["params"] + 4096  # float32 + header
    assert 0.0 <= numbers["agreement"] <= 1.0

    text = (finished_run / "report.md").read_text()
    for expected in ("test accuracy", "top-1 agreement", f"ECE, {N_BINS} bins", "size on disk", "CPU latency"):
        assert expected in text, expected
    assert f"| {100 * student['accuracy']:.2f} |" in text and "x fewer" in text
    assert "![reliability diagram](reliability.png)" in text
    assert "latency on the CPU with 2 threads" in text  # --cpu-threads / cpu_threads applied while measuring
    assert (finished_run / "reliability.png").stat().st_size > 5000


def test_kd_report_command(finished_run: Path, kd_home: Path) -> None:
    result = run("kd-report", str(finished_run), "--batch-size", "8", "--repeats", "2", "--warmup", "0", home=kd_home)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "kd-report" in result.stdout and "ECE, 15 bins" in result.stdout and "teacher" in result.stdout


@pytest.mark.parametrize("value", ["zero", "0", "-2"])
def test_kd_report_refuses_a_bad_cpu_threads_value(value: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(["some_run", "--cpu-threads", value])
    assert stopped.value.code == 2 and "--cpu-threads must be auto or a number >= 1" in capsys.readouterr().err


def test_ece_agrees_with_an_independent_computation() -> None:
    torch.manual_seed(0)
    logits, targets = 3 * torch.randn(500, 10), torch.randint(0, 10, (500,))
    probs = logits.softmax(-1).numpy()
    confidence, correct = probs.max(1), probs.argmax(1) == targets.numpy()
    ece = 0.0
    for low in range(N_BINS):
        in_bin = (confidence >= low / N_BINS) & (confidence < (low + 1) / N_BINS)
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    assert expected_calibration_error(logits, targets) == pytest.approx(ece, abs=1e-5)
    bins = ReliabilityBins.of(logits, targets)
    from_bins = float((bins.count / bins.count.sum() * (bins.accuracy - bins.confidence).abs()).sum())
    assert from_bins == pytest.approx(ece, abs=1e-5) and int(bins.count.sum()) == 500


def test_a_directory_that_is_not_a_finished_run_stops_with_one_line(
    finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(RunDirError, match="not a finished kd-distill run"):
        report(tmp_path)
    unfinished = tmp_path / "no_checkpoint"
    unfinished.mkdir()
    shutil.copy(finished_run / "summary.json", unfinished / "summary.json")
    summary = json.loads((unfinished / "summary.json").read_text())
    (unfinished / "summary.json").write_text(json.dumps({**summary, "best_checkpoint": ""}))
    with pytest.raises(RunDirError, match="has no student checkpoint"):
        report(unfinished)
    with pytest.raises(SystemExit) as stopped:
        main([str(tmp_path / "missing")])
    assert stopped.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kd-report: error: ") and "is not a directory" in lines[0]


def test_ratios_read_the_right_way_round_when_the_student_is_larger() -> None:
    from kd_lightning.recipes.report import Measured, rows

    teacher = Measured(accuracy=0.9, ece=0.05, params=100, size_bytes=4096, latency_s=0.001)
    student = Measured(accuracy=0.8, ece=0.05, params=1000, size_bytes=1024, latency_s=0.004)
    table = {row[0].split(" (")[0]: row[3] for row in rows({"teacher": teacher, "student": student}, 0.9, 64, 5)}
    assert table["parameters"] == "10.0x more"  # not "0.1x fewer"
    assert table["size on disk"] == "4.0x smaller" and table["CPU latency per batch of 64"] == "4.0x slower"
