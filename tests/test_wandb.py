"""``logger=wandb``: each job is one W&B run holding the config, parameter counts, metrics and the final
summary; sweep jobs are separate runs in one group; resume continues the run; no credentials or no
server means offline after one warning.

Runs are offline (WANDB_MODE=offline) and read back from their ``.wandb`` files: an offline run of
wandb 0.31 records config, history and summary only there (its ``files/`` holds no ``config.yaml`` or
``wandb-summary.json``), and wandb no longer ships a reader for them (``wandb.sdk.internal.datastore`` is
gone), so :func:`read_records` decodes the format with the protobuf classes wandb does ship.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import time
import zlib
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("wandb")

import wandb
from wandb.errors import CommError
from wandb.proto import wandb_internal_pb2

from kd_lightning.recipes.distill import distill
from kd_lightning.reporting.tracking import RUN_ID_FILE, WandbRunLogger, resumed_run_id
from tests.conftest import SWEEP_JOB, TINY, compose_config
from tests.test_cli import run

BLOCK = 32768  # wandb's LevelDB-style log: 32 KiB blocks of chunks, each behind a 7-byte header
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> list[wandb_internal_pb2.Record]:
    """The records of a ``.wandb`` file: a 7-byte file header (``:W&B``, magic 0xBEE1, version 0), then
    chunks ``crc32 (uint32) | length (uint16) | type (uint8) | data`` that never cross a 32 KiB block;
    FIRST/MIDDLE/LAST chunks join into one record; each record is a ``wandb_internal_pb2.Record``."""
    data = path.read_bytes()
    assert struct.unpack("<4sHB", data[:7]) == (b":W&B", 0xBEE1, 0), f"{path} is not a .wandb file"
    records, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # block trailer: too short for a header
            pos += BLOCK - pos % BLOCK
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:  # zero padding up to the next block
            pos += BLOCK - pos % BLOCK
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"corrupt chunk at byte {pos} of {path}"
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
        pos += 7 + length
    return records


def items_dict(items: Any) -> dict[str, Any]:
    return {item.key or ".".join(item.nested_key): json.loads(item.value_json) for item in items}


class OfflineRun:
    """What one offline W&B run recorded: run fields, config, history rows, summary, how it finished."""

    def __init__(self, path: Path) -> None:
        records = read_records(path)
        self.run = next(record.run for record in records if record.HasField("run"))
        self.config: dict[str, Any] = items_dict(self.run.config.update)
        self.history: list[dict[str, Any]] = []
        self.summary: dict[str, Any] = {}
        for record in records:
            if record.HasField("config"):
                self.config.update(items_dict(record.config.update))
            elif record.HasField("history"):
                self.history.append(items_dict(record.history.item))
            elif record.HasField("summary"):
                self.summary.update(items_dict(record.summary.update))
        self.exit_code = next((record.exit.exit_code for record in records if record.HasField("exit")), None)

    def logged(self, key: str) -> list[Any]:
        return [row[key] for row in self.history if key in row]


def offline_runs(run_dir: Path, timeout: float = 60.0) -> list[OfflineRun]:
    """The offline runs under ``run_dir/wandb``, read once each holds its exit record: wandb-core writes
    the file asynchronously and may still be flushing it when ``finish()`` returns."""
    paths = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not all(exit_recorded(path) for path in paths):
        time.sleep(0.2)
    return [OfflineRun(path) for path in paths]


def exit_recorded(path: Path) -> bool:
    return any(record.HasField("exit") for record in read_records(path))


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


WANDB_JOB = [*TINY, "logger=wandb", "compare_scratch=false", "trainer.max_epochs=1"]


def test_a_job_logs_config_params_metrics_and_summary_then_resume_continues_its_run(
    tmp_path: Path, kd_home: Path, offline: None
) -> None:
    run_dir = tmp_path / "run"
    summary = distill(compose_config(run_dir, [*WANDB_JOB, "loss.temperature=3"]))
    assert wandb.run is None  # finished at the end of the job
    (first,) = offline_runs(run_dir)
    assert first.exit_code == 0 and (run_dir / RUN_ID_FILE).read_text() == first.run.run_id
    assert first.run.project == "kd_lightning" and first.run.job_type == "distill" and not first.run.run_group

    assert first.config["loss"]["temperature"] == 3.0 and first.config["trainer"]["max_epochs"] == 1
    assert first.config["params/student"] == summary["student_params"] == 4810
    assert first.config["params/teacher"] == summary["teacher_params"]
    for key in ("train/loss", "train/loss_kd", "val/acc", "val/agreement", "teacher/val_acc", "test/acc"):
        assert first.logged(key), key
    assert first.logged("test/acc")[-1] == pytest.approx(summary["metrics"]["test/acc"])
    final = {key: value for key, value in first.summary.items() if key.startswith("summary/")}
    assert final["summary/test/acc"] == pytest.approx(summary["metrics"]["test/acc"])
    assert final["summary/teacher/test_acc"] == pytest.approx(summary["metrics"]["teacher/test_acc"])
    assert final["summary/compression"] == pytest.approx(summary["compression"])
    assert final["summary/student_params"] == 4810 and final["summary/seconds/total"] > 0
    assert "summary/config" not in final and not any(key.startswith("summary/config/") for key in final)

    resumed = distill(
        compose_config(run_dir, [*WANDB_JOB, "loss.temperature=3", "trainer.max_epochs=2", "ckpt_path=last"])
    )
    second = offline_runs(run_dir)[1]
    assert second.run.run_id == first.run.run_id and second.exit_code == 0
    assert min(second.logged("epoch")) == 1  # continued from the first epoch's checkpoint
    assert second.summary["summary/test/acc"] == pytest.approx(resumed["metrics"]["test/acc"])


def test_resume_finds_the_run_id_of_the_checkpoints_run(tmp_path: Path) -> None:
    old = tmp_path / "old"
    (old / "checkpoints").mkdir(parents=True)
    (old / "checkpoints" / "last.ckpt").touch()
    (old / RUN_ID_FILE).write_text("abc123\n")
    assert resumed_run_id("auto", old) == resumed_run_id("last", old) == "abc123"
    assert resumed_run_id(str(old / "checkpoints" / "last.ckpt"), tmp_path / "new") == "abc123"
    assert resumed_run_id(None, old) is None
    assert resumed_run_id("auto", tmp_path / "new") is None  # auto without a checkpoint: a fresh run


def test_a_run_left_open_by_a_failed_job_is_finished_not_reused(tmp_path: Path, offline: None) -> None:
    left_open = wandb.init(project="kd_lightning", dir=str(tmp_path / "failed"))
    logger = WandbRunLogger(save_dir=str(tmp_path / "next"), project="kd_lightning")
    run = logger.experiment
    assert run.id != left_open.id
    run.finish()
    (failed,) = offline_runs(tmp_path / "failed")
    assert failed.exit_code == 1 and failed.run.run_id == left_open.id


def test_no_credentials_logs_offline_with_one_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = WandbRunLogger(save_dir=str(tmp_path), project="kd_lightning", log_model=True)
    with caplog.at_level(logging.WARNING, logger="kd_lightning.reporting.tracking"):
        experiment = logger.experiment
        experiment.log({"x": 1.0})
        experiment.finish()
    warnings = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "no W&B credentials" in warnings[0] and "log_model" in warnings[0]
    assert "WANDB_MODE" not in os.environ  # the fallback is this run's, not the process's
    (recorded,) = offline_runs(tmp_path)
    assert recorded.logged("x") == [1.0] and recorded.exit_code == 0


def test_unreachable_server_logs_offline_with_one_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.setenv("WANDB_SILENT", "true")
    real_init = wandb.init

    def init_without_network(**kwargs: Any) -> Any:  # what wandb.init raises after init_timeout
        if kwargs.get("mode") != "offline":
            raise CommError("Timed out while retrying: dial tcp: lookup api.wandb.ai: no such host")
        return real_init(**kwargs)

    monkeypatch.setattr(wandb, "init", init_without_network)
    logger = WandbRunLogger(save_dir=str(tmp_path), project="kd_lightning")
    with caplog.at_level(logging.WARNING, logger="kd_lightning.reporting.tracking"):
        logger.experiment.finish()
    warnings = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "could not be reached" in warnings[0] and "no such host" in warnings[0]
    assert len(offline_runs(tmp_path)) == 1


def test_after_one_unreachable_job_the_sweeps_later_jobs_go_offline_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from kd_lightning.reporting import tracking

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setattr(tracking, "unreachable_marker", lambda: tmp_path / ".wandb_unreachable")
    real_init, online_tries = wandb.init, []

    def init_without_network(**kwargs: Any) -> Any:
        if kwargs.get("mode") != "offline":
            online_tries.append(1)
            raise CommError("Timed out while retrying: dial tcp: lookup api.wandb.ai: no such host")
        return real_init(**kwargs)

    monkeypatch.setattr(wandb, "init", init_without_network)
    with caplog.at_level(logging.WARNING, logger="kd_lightning.reporting.tracking"):
        for job in ("0", "1", "2"):
            WandbRunLogger(save_dir=str(tmp_path / job), project="kd_lightning").experiment.finish()
    assert len(online_tries) == 1  # only the first job waited for the server
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name == tracking.log.name]
    assert len(warnings) == 3 and all("earlier job of this sweep" in w for w in warnings[1:])
    assert all(len(offline_runs(tmp_path / job)) == 1 for job in ("0", "1", "2"))


def test_sweep_jobs_are_separate_runs_in_one_group(kd_home: Path, offline: None) -> None:
    sweep_dir = kd_home / "wandb_sweep"
    job = [override for override in SWEEP_JOB if not override.startswith("logger=")]
    result = run(
        "kd-distill", "-m", "loss.temperature=1,4", *job, "logger=wandb", f"hydra.sweep.dir={sweep_dir}", home=kd_home
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = [offline_runs(sweep_dir / str(number)) for number in (0, 1)]
    assert [len(job_runs) for job_runs in runs] == [1, 1]
    first, second = runs[0][0], runs[1][0]
    assert first.run.run_id != second.run.run_id
    assert first.run.run_group == second.run.run_group == sweep_dir.name
    assert (first.config["loss"]["temperature"], second.config["loss"]["temperature"]) == (1.0, 4.0)
    assert first.exit_code == second.exit_code == 0
    assert all(job_run.summary["summary/test/acc"] == job_run.logged("test/acc")[-1] for job_run in (first, second))
