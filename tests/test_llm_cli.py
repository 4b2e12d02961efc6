"""kd-llm-distill end to end as a subprocess, on tiny random models (no GGUF)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.test_cli import run

TINY_LM = ["llm/teacher=tiny", "llm/student=tiny", "trainer.max_steps=3", "+trainer.enable_progress_bar=false"]


@pytest.mark.parametrize(
    "overrides",
    [["llm/loss=forward_kl"], ["llm/loss=jsd", "llm/method=on_policy"], ["llm/method=sft"]],
    ids=["forward_kl", "jsd_on_policy", "sft"],
)
def test_kd_llm_distill_trains_and_reports_validation_metrics(overrides: list[str], kd_home: Path) -> None:
    run_dir = kd_home / "llm_cli" / overrides[0].split("=")[1] / overrides[-1].split("=")[1]
    # in-epoch progress lines after every step (without a terminal; default: at most every 30 s)
    interval = "callbacks.epoch_lines.interval_s=0.000001"
    result = run("kd-llm-distill", *TINY_LM, *overrides, interval, f"hydra.run.dir={run_dir}", home=kd_home)
    assert result.returncode == 0, result.stderr[-3000:]
    # max_steps=3 bounds the run: its ETA counts the steps left, whatever the epoch's length
    steps = re.findall(
        r"^llm_distill epoch 1/1  step (\d+)/\d+  [\d,]+ samples/s  .*run ETA \d+ s$", result.stdout, re.M
    )
    assert steps == ["1", "2", "3"], result.stdout[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    # max_steps ends the fit before the epoch's validation: a final validation still reports metrics,
    # and SFT (alpha = 0) runs still measure the KL to the teacher.
    for key in ("val/loss", "val/ppl", "val/kl_to_teacher"):
        assert summary["metrics"][key] >= 0, key
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()


def test_kd_llm_distill_names_the_key_of_a_mismatched_tokenizer(kd_home: Path) -> None:
    result = run(
        "kd-llm-distill",
        *TINY_LM,
        "llm.student.vocab_size=50",
        f"hydra.run.dir={kd_home / 'llm_cli' / 'bad'}",
        home=kd_home,
    )
    assert result.returncode == 2 and "llm.student" in result.stderr


@pytest.mark.slow  # 2 spawned gloo processes (see tests/test_distributed.py)
def test_kd_llm_distill_with_ddp_spawn_writes_one_run(kd_home: Path) -> None:
    run_dir = kd_home / "llm_cli" / "ddp_spawn"
    result = run(
        "kd-llm-distill", *TINY_LM, "trainer=ddp_spawn", "trainer.devices=2", f"hydra.run.dir={run_dir}", home=kd_home
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["metrics"]["val/loss"] > 0
    assert len(list((run_dir / "csv").iterdir())) == 1


@pytest.mark.parametrize("cache", ["none", "top_k"])
def test_kd_llm_distill_on_packed_batches_reports_the_metrics_of_padded_batches(cache: str, kd_home: Path) -> None:
    """llm.data.packing=true end to end (about 3 examples per row), with a live teacher and with the logit cache
    built from packed rows: the same examples per step, so the same losses as padded batches (to float error)."""
    metrics = {}
    for packing in ("true", "false"):
        run_dir = kd_home / "llm_cli" / f"packing_{cache}_{packing}"
        overrides = [f"llm.data.packing={packing}", "llm.data.pack_length=480", f"llm/teacher_cache={cache}"]
        result = run("kd-llm-distill", *TINY_LM, *overrides, f"hydra.run.dir={run_dir}", home=kd_home)
        assert result.returncode == 0, result.stderr[-3000:]
        metrics[packing] = json.loads((run_dir / "summary.json").read_text())["metrics"]
    assert metrics["true"]["val/loss"] > 0
    assert metrics["true"] == pytest.approx(metrics["false"], rel=1e-5, abs=1e-7)
