"""``kd-export RUN_DIR`` on a tiny finished run: each format is written, reloaded and matches the checkpoint, the
manifest lists it, an export whose outputs differ stops with one line, the int8 model runs and its accuracy is
reported, and a folder that is not a run is one line, exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kd_lightning.cli.export import main
from kd_lightning.recipes import export as export_recipe
from kd_lightning.recipes.export import export
from kd_lightning.recipes.finished_run import Run, load_student
from kd_lightning.recipes.report import report
from tests.conftest import TINY
from tests.test_cli import run

try:
    import onnx  # noqa: F401
    import onnxruntime
    import onnxscript  # noqa: F401

    HAS_DEPLOY = True
except ImportError:
    HAS_DEPLOY = False
needs_deploy = pytest.mark.skipif(not HAS_DEPLOY, reason="needs the deploy extra (onnx, onnxruntime, onnxscript)")

TINY_RUN = [
    *TINY,
    "trainer.max_epochs=1",
    "teacher.fit.max_epochs=1",
    "data.transfer_samples=500",
    "compare_scratch=false",
    "logger=none",
]


@pytest.fixture(scope="module")
def finished_run(kd_home: Path) -> Path:
    run_dir = kd_home / "export_run"
    result = run("kd-distill", *TINY_RUN, f"hydra.run.dir={run_dir}", home=kd_home)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def held_batch(run_dir: Path) -> tuple[torch.nn.Module, torch.Tensor]:
    from kd_lightning.engine.instantiate import build
    from kd_lightning.recipes.fit import supervised_data

    finished = Run.read(run_dir)
    datamodule = build(finished.cfg.data, "data", **supervised_data(finished.cfg.data))
    datamodule.prepare_data()
    datamodule.setup("test")
    return load_student(finished).eval(), next(iter(datamodule.test_dataloader()))[0]


def test_torch_export_is_written_reloads_and_matches(finished_run: Path) -> None:
    manifest = export(finished_run, ["torch-export"])
    (entry,) = manifest["artefacts"]
    path = finished_run / "export" / "student.pt2"
    assert entry["format"] == "torch-export" and entry["file"] == "student.pt2"
    assert entry["size_bytes"] == path.stat().st_size and entry["max_abs_diff"] <= entry["tolerance"] == 1e-4
    student, x = held_batch(finished_run)
    loaded = torch.export.load(str(path)).module()
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x[:3]), student(x[:3]), atol=1e-4, rtol=0)  # another batch size
    assert json.loads((finished_run / "export" / "export.json").read_text()) == manifest


@needs_deploy
def test_kd_export_writes_onnx_and_int8_and_reports_accuracy(finished_run: Path, kd_home: Path) -> None:
    result = run("kd-export", str(finished_run), "--int8", "--calibration-batches", "2", home=kd_home)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((finished_run / "export" / "export.json").read_text())
    entries = {entry["format"]: entry for entry in manifest["artefacts"]}
    assert set(entries) == {"onnx", "torch-export", "onnx-int8"}
    assert entries["onnx"]["opset"] == 18 and entries["onnx"]["max_abs_diff"] <= 1e-4
    for entry in entries.values():
        assert (finished_run / "export" / entry["file"]).stat().st_size == entry["size_bytes"] > 0
    int8 = entries["onnx-int8"]
    assert int8["calibration_batches"] == 2 and int8["test_samples"] > 0
    for key in ("test_accuracy_float", "test_accuracy_int8", "test_agreement"):
        assert 0.0 <= int8[key] <= 1.0
    summary = json.loads((finished_run / "summary.json").read_text())
    assert int8["test_accuracy_float"] == pytest.approx(summary["metrics"]["test/acc"], abs=1e-6)
    assert "agreement with float" in result.stdout and "opset 18" in result.stdout

    # The files run outside kd_lightning: ONNX Runtime on the float and the int8 model, batch of 1.
    student, x = held_batch(finished_run)
    for name in ("student.onnx", "student.int8.onnx"):
        session = onnxruntime.InferenceSession(str(finished_run / "export" / name), providers=["CPUExecutionProvider"])
        (logits,) = session.run(None, {"input": x[:1].numpy()})
        assert logits.shape == (1, student(x[:1]).shape[-1])


def test_kd_report_measures_the_exported_files(finished_run: Path) -> None:
    formats = ["onnx", "torch-export"] if HAS_DEPLOY else ["torch-export"]
    export(finished_run, formats, int8=HAS_DEPLOY, calibration_batches=1)
    threads = torch.get_num_threads()
    try:
        numbers = report(finished_run, repeats=2, warmup=0, cpu_threads=1)
    finally:
        torch.set_num_threads(threads)
    deployed = {row["deployed student"]: row for row in numbers["deployed"]}
    files = {"student.pt2", *(["student.onnx", "student.int8.onnx"] if HAS_DEPLOY else [])}
    assert set(deployed) == {"student checkpoint", *files, "teacher checkpoint"}
    teacher = deployed["teacher checkpoint"]
    assert float(teacher["test accuracy (%)"]) == pytest.approx(100 * numbers["teacher"]["accuracy"], abs=0.006)
    assert float(teacher["CPU latency, batch of 64 (ms)"]) > 0
    for name in files:
        row = deployed[name]
        assert float(row["size on disk (KiB)"]) == pytest.approx(
            (finished_run / "export" / name).stat().st_size / 1024, abs=0.06
        )
        assert float(row["CPU latency, batch of 1 (ms)"]) > 0
        assert float(row["CPU latency, batch of 64 (ms)"]) > 0
    # Accuracy and agreement with the teacher of every file, over the whole test split: the float exports
    # predict what the checkpoint predicts; the int8 file what kd-export measured.
    checkpoint = deployed["student checkpoint"]
    assert float(checkpoint["test accuracy (%)"]) == pytest.approx(100 * numbers["student"]["accuracy"], abs=0.006)
    assert float(checkpoint["agreement with teacher (%)"]) == pytest.approx(100 * numbers["agreement"], abs=0.006)
    for name in files - {"student.int8.onnx"}:
        assert deployed[name]["test accuracy (%)"] == checkpoint["test accuracy (%)"]
        assert deployed[name]["agreement with teacher (%)"] == checkpoint["agreement with teacher (%)"]
    if HAS_DEPLOY:
        listed = json.loads((finished_run / "export" / "export.json").read_text())["artefacts"]
        int8 = next(a for a in listed if a["format"] == "onnx-int8")
        got = float(deployed["student.int8.onnx"]["test accuracy (%)"])
        assert got == pytest.approx(100 * int8["test_accuracy_int8"], abs=0.006)
    assert (
        "| deployed student | format | size on disk (KiB) | CPU latency, batch of 1 (ms) |"
        in (finished_run / "report.md").read_text()
    )


@pytest.mark.parametrize("fmt", ["torch-export", *(["onnx"] if HAS_DEPLOY else [])])
def test_an_export_whose_outputs_differ_stops_with_one_line(
    finished_run: Path, fmt: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    writer = "export_program" if fmt == "torch-export" else "export_onnx"
    original = getattr(export_recipe, writer)

    def off_by_one(*args, **kwargs):
        exported = original(*args, **kwargs)
        return lambda x: exported(x) + 1.0

    monkeypatch.setattr(export_recipe, writer, off_by_one)
    with pytest.raises(SystemExit) as stopped:
        main([str(finished_run), "--format", fmt])
    assert stopped.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kd-export: error: "), lines
    assert "differs from the checkpoint by 1" in lines[0] and "--atol" in lines[0] and "--format" in lines[0]
    assert not (finished_run / "export" / export_recipe.FILES[fmt]).exists()  # the unchecked file is removed


class Branchy(torch.nn.Module):
    """A student with a data-dependent branch: no exporter can trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(40, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) if x.sum() > 0 else -self.fc(x)


@pytest.mark.parametrize("fmt", ["torch-export", *(["onnx"] if HAS_DEPLOY else [])])
def test_a_student_that_cannot_be_traced_is_one_line_naming_the_branch(
    finished_run: Path, fmt: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(export_recipe, "load_student", lambda run: Branchy())
    with pytest.raises(SystemExit) as stopped:
        main([str(finished_run), "--format", fmt])
    assert stopped.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kd-export: error: "), captured.err[-2000:]
    assert "data-dependent" in lines[0] and "torch.cond" in lines[0] and "--format" in lines[0]
    assert not captured.out.strip()  # the exporter's graph dump and progress stay out of the terminal


def test_a_folder_that_is_not_a_run_is_one_line_exit_2(tmp_path: Path, kd_home: Path) -> None:
    result = run("kd-export", str(tmp_path), home=kd_home)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kd-export: error: ") and "not a finished kd-distill run" in lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(("args", "message"), [(["--atol", "-1"], "--atol"), (["--format", "tflite"], "--format")])
def test_bad_options_are_refused(args: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(["some_run", *args])
    assert stopped.value.code == 2 and message in capsys.readouterr().err


def zoo_students() -> list:
    """The students the export is checked on besides the default MLP: the MNIST-1D CNN (student=cnn1d_narrow's
    class) and two CIFAR-zoo networks (a residual and a depthwise one), with an input of their data's shape."""
    from kd_lightning.models import ConvNet1D
    from kd_lightning.models.cifar import mobilenetv2, resnet8

    return [
        pytest.param(lambda: ConvNet1D(num_classes=10, channels=8, depth=2), (4, 1, 40), id="cnn1d"),
        pytest.param(lambda: resnet8(num_classes=100), (4, 3, 32, 32), id="cifar_resnet8"),
        pytest.param(lambda: mobilenetv2(num_classes=100), (4, 3, 32, 32), id="cifar_mobilenetv2"),
    ]


@pytest.mark.parametrize("fmt", ["torch-export", *(["onnx"] if HAS_DEPLOY else [])])
@pytest.mark.parametrize(("make", "shape"), zoo_students())
def test_cnn_and_cifar_zoo_students_export_reload_and_match(
    make, shape: tuple[int, ...], fmt: str, tmp_path: Path
) -> None:
    """Each format of each student is written, reloaded (torch.export.load / an ONNX Runtime session) and
    matches the float model within kd-export's default tolerance, also at another batch size."""
    torch.manual_seed(0)
    student = make().eval()
    x = torch.randn(*shape)
    if fmt == "torch-export":
        exported = export_recipe.export_program(student, x, tmp_path / "student.pt2", static=False)
    else:
        exported = export_recipe.export_onnx(student, x, tmp_path / "student.onnx", static=False, opset=18)
    assert export_recipe.check(fmt, tmp_path / "student", exported, student, x, atol=1e-4) <= 1e-4
    assert export_recipe.check(fmt, tmp_path / "student", exported, student, x[:1], atol=1e-4) <= 1e-4


def test_the_hf_format_of_a_student_that_is_not_hugging_face_is_one_line(finished_run: Path, capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        main([str(finished_run), "--format", "hf"])
    assert stop.value.code == 2
    assert "--format hf writes Hugging Face students; this student is a" in capsys.readouterr().err
