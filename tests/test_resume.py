"""ckpt_path=last / auto: resuming a run directory continues training instead of refusing it."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY, tiny_trainer
from tests.test_cli import run

NO_SCRATCH = [*TINY, "compare_scratch=false"]


def last_epoch(run_dir: Path) -> int:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["epoch"]


@pytest.mark.slow  # ckpt_path=last is also resumed in the default suite, by the killed-run test below
def test_resume_last_continues_training(kd_home: Path) -> None:
    run_dir = kd_home / "resumable"
    first = run("kd-distill", *NO_SCRATCH, "trainer.max_epochs=1", f"hydra.run.dir={run_dir}", home=kd_home)
    assert first.returncode == 0, first.stderr[-3000:]
    assert last_epoch(run_dir) == 0
    resumed = run(
        "kd-distill", *NO_SCRATCH, "trainer.max_epochs=2", "ckpt_path=last", f"hydra.run.dir={run_dir}", home=kd_home
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Restoring states from the checkpoint path" in resumed.stdout + resumed.stderr
    assert last_epoch(run_dir) == 1  # 0-based: the second epoch ran


def test_auto_starts_fresh_and_last_without_checkpoint_is_a_one_line_error(kd_home: Path) -> None:
    fresh = kd_home / "auto_fresh"
    started = run(
        "kd-distill", *NO_SCRATCH, "trainer.max_epochs=1", "ckpt_path=auto", f"hydra.run.dir={fresh}", home=kd_home
    )
    assert started.returncode == 0, started.stderr[-3000:]
    missing = run("kd-distill", *NO_SCRATCH, "ckpt_path=last", f"hydra.run.dir={kd_home / 'never_ran'}", home=kd_home)
    assert missing.returncode == 2
    assert "kd-distill: error: ckpt_path=last:" in missing.stderr and "does not exist" in missing.stderr


def student_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    return {name: value for name, value in state.items() if name.startswith("student.")}


def test_a_run_killed_mid_training_resumes_to_exactly_the_uninterrupted_run(kd_home: Path) -> None:
    common = [*NO_SCRATCH, "trainer.max_epochs=4", "trainer.deterministic=true"]
    whole, killed = kd_home / "uninterrupted", kd_home / "killed"
    done = run("kd-distill", *common, f"hydra.run.dir={whole}", home=kd_home)
    assert done.returncode == 0, done.stderr[-3000:]
    kill = ["+callbacks.kill._target_=tests.custom_callbacks.KillAtEpoch", "+callbacks.kill.epoch=2"]
    crashed = run("kd-distill", *common, *kill, f"hydra.run.dir={killed}", home=kd_home)
    assert crashed.returncode == -signal.SIGKILL and not (killed / "summary.json").exists()
    assert last_epoch(killed) == 1  # the last checkpoint is from the end of epoch 1
    resumed = run("kd-distill", *common, "ckpt_path=last", f"hydra.run.dir={killed}", home=kd_home)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected, got = student_weights(whole), student_weights(killed)
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    metrics = [json.loads((d / "summary.json").read_text())["metrics"] for d in (whole, killed)]
    for key in ("val/acc_best", "val/acc", "test/acc", "test/acc_last", "train/loss"):
        assert metrics[0][key] == metrics[1][key], key  # val/acc_best spans the kill: it is checkpointed


def test_a_finished_run_requeued_exits_zero_and_stays_intact(kd_home: Path) -> None:
    run_dir = kd_home / "finished"
    first = run("kd-distill", *NO_SCRATCH, "trainer.max_epochs=1", f"hydra.run.dir={run_dir}", home=kd_home)
    assert first.returncode == 0, first.stderr[-3000:]
    before = {
        path.name: path.read_bytes() for path in (run_dir / "summary.json", run_dir / "checkpoints" / "last.ckpt")
    }
    again = run(
        "kd-distill", *NO_SCRATCH, "trainer.max_epochs=1", "ckpt_path=auto", f"hydra.run.dir={run_dir}", home=kd_home
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already finished" in again.stdout + again.stderr
    after = {path.name: path.read_bytes() for path in (run_dir / "summary.json", run_dir / "checkpoints" / "last.ckpt")}
    assert after == before


def test_a_checkpoint_save_that_dies_leaves_the_previous_one(tmp_path: Path, monkeypatch) -> None:
    from lightning.fabric.plugins import TorchCheckpointIO

    from kd_lightning.engine.checkpointing import AtomicCheckpointIO

    io, target = AtomicCheckpointIO(), tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, target)
    monkeypatch.setenv("TMPDIR", str(tmp_path / "elsewhere"))  # a TMPDIR on another filesystem is never used

    def dies_half_way(self, checkpoint, path, storage_options=None) -> None:
        Path(path).write_bytes(b"half a checkpoint")
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(TorchCheckpointIO, "save_checkpoint", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, target)
    assert torch.equal(torch.load(target, weights_only=True)["state_dict"]["w"], torch.ones(3))
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]  # no partial file left


def test_last_ckpt_is_the_last_epoch_even_when_the_monitored_metric_stopped_improving(tmp_path: Path) -> None:
    """Lightning alone refreshes last.ckpt only with a new top-k checkpoint; with lr = 0 val/acc never
    improves after epoch 0, yet last.ckpt must hold the final epoch (what ckpt_path=last resumes)."""
    from kd_lightning.recipes.distill import distill
    from tests.conftest import TINY, compose_config

    run_dir = tmp_path / "run"
    overrides = [*TINY, "trainer.max_epochs=3", "optimizer.lr=0.0", "compare_scratch=false", "logger=none"]
    summary = distill(compose_config(run_dir, overrides))
    assert Path(summary["best_checkpoint"]).name == "epoch_000.ckpt"  # the only improvement
    assert last_epoch(run_dir) == 2


def test_a_run_that_max_steps_ends_inside_an_epoch_validates_before_its_final_checkpoint(
    tmp_path: Path, recwarn: pytest.WarningsRecorder
) -> None:
    """max_steps=3 of 8 batches: the monitored val/loss comes from a validation after step 3, so the checkpoint
    saved at the end has it (no "could not find the monitored key" warning, a best checkpoint of step 3)."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from kd_lightning.callbacks import ModelCheckpoint

    class Regression(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)
            self.validated_at: list[int] = []

        def training_step(self, batch, batch_idx):
            return torch.nn.functional.mse_loss(self.layer(batch[0]), batch[1])

        def validation_step(self, batch, batch_idx):
            self.log("val/loss", torch.nn.functional.mse_loss(self.layer(batch[0]), batch[1]))

        def on_validation_end(self) -> None:
            self.validated_at.append(self.global_step)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = TensorDataset(torch.randn(32, 2), torch.randn(32, 1))
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="step_{step}", monitor="val/loss", save_last=True)
    module = Regression()
    trainer = tiny_trainer(
        max_steps=3,
        callbacks=[checkpoint],
        num_sanity_val_steps=0,
        enable_checkpointing=True,
    )
    trainer.fit(module, DataLoader(data, batch_size=4), DataLoader(data, batch_size=8))
    assert trainer.global_step == 3 and module.validated_at == [3]
    assert not [w for w in recwarn if "could not find the monitored key" in str(w.message)]
    assert Path(checkpoint.best_model_path).name == "step_step=3.ckpt" and (tmp_path / "last.ckpt").is_file()
    assert torch.isfinite(checkpoint.best_model_score)
