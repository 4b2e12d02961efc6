"""``kd-export --format hf``: a Hugging Face text student and a kd-llm-distill causal-LM student written with
``save_pretrained`` (tokenizer included), reloaded offline by ``transformers``' Auto classes and equal to the
checkpoint; formats a student cannot take are one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("datasets")

from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from kd_lightning.cli.export import main
from kd_lightning.engine.instantiate import build
from kd_lightning.recipes.distill import distill
from kd_lightning.recipes.export import export
from kd_lightning.recipes.export_hf import lm_student
from kd_lightning.recipes.finished_run import Run, load_student
from kd_lightning.recipes.fit import supervised_data
from tests.conftest import compose_config
from tests.test_cli import run
from tests.test_text_runs import overrides, text_data  # noqa: F401  (the module-scoped fixture)


def test_a_text_student_is_saved_with_its_tokenizer_and_reloads_offline(text_data, tmp_path: Path) -> None:  # noqa: F811
    run_dir = tmp_path / "run"
    distill(compose_config(run_dir, overrides(text_data)))
    manifest = export(run_dir)  # the default for a Hugging Face student: hf
    assert [a["format"] for a in manifest["artefacts"]] == ["hf"]
    saved = run_dir / "export" / "student_hf"
    model = AutoModelForSequenceClassification.from_pretrained(str(saved), local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(saved), local_files_only=True)
    student = load_student(Run.read(run_dir)).eval()
    datamodule = build(Run.read(run_dir).cfg.data, "data", **supervised_data(Run.read(run_dir).cfg.data))
    datamodule.prepare_data()
    datamodule.setup("test")
    batch = next(iter(datamodule.test_dataloader()))[0]
    with torch.inference_mode():
        keys = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        torch.testing.assert_close(model(**keys).logits, student(batch), atol=1e-5, rtol=0)
    original = AutoTokenizer.from_pretrained(str(text_data["student_tok"]))
    assert tokenizer("a short sentence here")["input_ids"] == original("a short sentence here")["input_ids"]
    assert manifest["artefacts"][0]["max_abs_diff"] <= 1e-4 and manifest["artefacts"][0]["size_bytes"] > 0
    with pytest.raises(Exception, match="use --format hf"):
        export(run_dir, ["onnx"])  # a mapping of tensors: ONNX and torch.export take one tensor


@pytest.fixture(scope="module")
def lm_run(kd_home: Path) -> Path:
    run_dir = kd_home / "export_lm"
    result = run(
        "kd-llm-distill",
        "llm/teacher=tiny",
        "llm/student=tiny",
        "trainer.max_steps=2",
        "+trainer.enable_progress_bar=false",
        "llm.data.train_prompts.num_prompts=8",
        "llm.data.val_prompts.num_prompts=4",
        f"hydra.run.dir={run_dir}",
        home=kd_home,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def test_a_causal_lm_student_is_saved_with_its_tokenizer_and_reloads_offline(lm_run: Path, capsys) -> None:
    main([str(lm_run)])
    assert "student_hf" in capsys.readouterr().out
    manifest = json.loads((lm_run / "export" / "export.json").read_text())
    assert [a["format"] for a in manifest["artefacts"]] == ["hf"] and manifest["artefacts"][0]["max_abs_diff"] <= 1e-4
    saved = lm_run / "export" / "student_hf"
    model = AutoModelForCausalLM.from_pretrained(str(saved), local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(saved), local_files_only=True)
    student, original = lm_student(Run.read(lm_run))
    ids = torch.tensor([original("What is 2 + 3?")["input_ids"]])
    assert tokenizer("What is 2 + 3?")["input_ids"] == ids[0].tolist()
    with torch.inference_mode():
        torch.testing.assert_close(model(input_ids=ids).logits, student(input_ids=ids).logits, atol=1e-5, rtol=0)
        trained = {k: v for k, v in student.state_dict().items()}
    fresh = AutoModelForCausalLM.from_config(model.config)
    assert any(not torch.equal(fresh.state_dict()[k], v) for k, v in trained.items())  # not an untrained copy


def test_an_lm_run_takes_only_the_hf_format(lm_run: Path, capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        main([str(lm_run), "--format", "onnx"])
    assert stop.value.code == 2
    assert "written with --format hf only" in capsys.readouterr().err
