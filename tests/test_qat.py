"""Quantization-aware distillation (``callbacks=qat``): the swap keeps the optimizer's parameters, fake-quantizes
the MLP and the 1-D CNN, puts the float layers back, refuses a student it cannot handle in one line; a tiny run
trains with fake quantization in its last epoch, its checkpoint loads into the float student and kd-export --int8
quantizes it."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from kd_lightning.callbacks import QuantizationAware
from kd_lightning.callbacks.qat import FakeQuantized, float_state
from kd_lightning.engine.errors import ConfigError
from kd_lightning.models import MLP
from kd_lightning.models.mnist1d import ConvNet1D
from kd_lightning.recipes.finished_run import Run, load_student
from tests.conftest import TINY
from tests.test_cli import run
from tests.test_export import needs_deploy


def fake_quant_modules(model: nn.Module) -> list[str]:
    from torch.ao.quantization import FakeQuantizeBase

    return [name for name, module in model.named_modules() if isinstance(module, FakeQuantizeBase)]


@pytest.mark.parametrize("make", [lambda: MLP(hidden=16), lambda: ConvNet1D(channels=4, depth=2)], ids=["mlp", "cnn"])
def test_swap_keeps_parameters_fake_quantizes_and_restores(make) -> None:
    torch.manual_seed(0)
    student = make()
    keys = list(student.state_dict())
    params = list(student.parameters())
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-2)
    x = torch.randn(8, 40)
    float_out = student(x).detach()

    quantized = FakeQuantized(student)
    assert fake_quant_modules(student)
    weight_fq = [name for name in fake_quant_modules(student) if name.endswith("weight_fake_quant")]
    assert len(weight_fq) == sum(isinstance(m, (nn.Linear, nn.Conv1d)) for m in quantized.float_layers.values())
    assert all(a is b for a, b in zip(student.parameters(), params, strict=True))  # the optimizer's tensors
    assert not torch.equal(student(x), float_out)  # fake quantization is in the forward
    before = [p.detach().clone() for p in params]
    for _ in range(2):  # the optimizer steps the QAT modules' weights (Adam state included)
        optimizer.zero_grad()
        student(x).logsumexp(-1).mean().backward()
        optimizer.step()
    assert all(not torch.equal(p, b) for p, b in zip(student.parameters(), before, strict=True))
    assert set(float_state(student.state_dict())) == set(keys)

    quantized.restore()
    assert list(student.state_dict()) == keys and not fake_quant_modules(student)
    assert all(a is b for a, b in zip(student.parameters(), params, strict=True))
    fresh = make()
    fresh.load_state_dict(student.state_dict())
    torch.testing.assert_close(fresh(x), student(x))  # a plain float model again, with the trained weights


def test_a_student_it_cannot_handle_is_one_line_naming_the_key() -> None:
    student = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.LayerNorm(4), nn.Linear(4, 3))
    with pytest.raises(ConfigError) as error:
        FakeQuantized(student)
    message = str(error.value)
    assert "\n" not in message and "callbacks.qat" in message and "student.model" in message and "Embedding" in message
    with pytest.raises(ConfigError, match=r"callbacks\.qat\.epochs"):
        QuantizationAware(epochs=0)


@pytest.fixture(scope="module")
def qat_run(kd_home: Path) -> Path:
    run_dir = kd_home / "qat_run"
    overrides = [*TINY, "data.transfer_samples=500", "compare_scratch=false", "logger=csv"]
    result = run(
        "kd-distill", *overrides, "callbacks=qat", "callbacks.qat.epochs=1", f"hydra.run.dir={run_dir}", home=kd_home
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def test_qat_run_trains_fake_quantized_in_its_last_epoch_and_saves_float_checkpoints(qat_run: Path) -> None:
    (metrics,) = qat_run.glob("csv/**/metrics.csv")
    rows = list(csv.DictReader(metrics.open()))
    schedule = {int(r["epoch"]): float(r["schedule/qat"]) for r in rows if r.get("schedule/qat")}
    assert schedule == {0: 0.0, 1: 1.0}
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert losses and all(math.isfinite(loss) for loss in losses)
    finished = Run.read(qat_run)
    assert "epoch_001" in finished.checkpoint.name  # the best checkpoint is a fake-quantized epoch's
    for path in (finished.checkpoint, qat_run / "checkpoints" / "last.ckpt"):
        state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
        assert not [key for key in state if "activation_post_process" in key or "fake_quant" in key]
    student = load_student(finished)  # strict: the float student's keys, exactly
    assert isinstance(student, MLP) and not fake_quant_modules(student)
    assert math.isfinite(json.loads((qat_run / "summary.json").read_text())["metrics"]["test/acc"])


@needs_deploy
def test_kd_export_int8_quantizes_the_qat_student(qat_run: Path) -> None:
    from kd_lightning.recipes.export import export

    manifest = export(qat_run, ["onnx"], int8=True, calibration_batches=2)
    int8 = next(entry for entry in manifest["artefacts"] if entry["format"] == "onnx-int8")
    assert 0.0 <= int8["test_accuracy_int8"] <= 1.0 and (qat_run / "export" / "student.int8.onnx").is_file()
