"""Pruned students (kd_lightning.llm.pruning, llm/student=pruned) on tiny random Llamas: shapes and parameter
counts by formula, exact equality when nothing is pruned, planted unimportant layers / channels / heads removed,
and the pruned model equal to the teacher with the removed channels and heads masked out."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kd_lightning.engine.errors import ConfigError
from kd_lightning.llm.importance import calibration_batches, measure_importance
from kd_lightning.llm.models import char_tokenizer, random_llama
from kd_lightning.llm.pruning import PrunePlan, apply_plan, plan_pruning, pruned
from tests.test_cli import run

CALIBRATION = {"prompts": {"kind": "mixed", "seed": 0}, "num_examples": 4, "max_length": 48}


@pytest.fixture(scope="module")
def calibration() -> dict:
    return {**CALIBRATION, "tokenizer": char_tokenizer()}


def mha_teacher() -> LlamaForCausalLM:
    """4 layers, 4 heads of width 8 (one key/value head each), 64 MLP channels, vocabulary 128 (tied)."""
    return random_llama(vocab_size=128, hidden_size=32, num_layers=4, num_heads=4, intermediate_size=64, seed=3)


def gqa_teacher() -> LlamaForCausalLM:
    """3 layers, 6 query heads of width 8 sharing 2 key/value heads (groups of 3), 48 MLP channels."""
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=48,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        intermediate_size=48,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    torch.manual_seed(4)
    return LlamaForCausalLM(config).eval()


TEACHERS = {"mha": mha_teacher, "gqa": gqa_teacher}


def ids() -> torch.Tensor:
    return torch.randint(3, 100, (2, 17), generator=torch.Generator().manual_seed(0))


def logits(model: LlamaForCausalLM) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids()).logits


def expected_parameters(vocab: int, hidden: int, layers: int, heads: int, kv_heads: int, width: int, mlp: int) -> int:
    """Tied embeddings + final norm + per layer: q/o (hidden x heads*width each), k/v (hidden x kv_heads*width
    each), gate/up/down (hidden x mlp each) and two norms."""
    per_layer = 2 * hidden * heads * width + 2 * hidden * kv_heads * width + 3 * hidden * mlp + 2 * hidden
    return vocab * hidden + hidden + layers * per_layer


@pytest.mark.parametrize(
    ("name", "keep_layers", "mlp_keep", "heads_keep", "shape"),
    [
        ("mha", 2, 0.5, 2, (2, 32, 2, 2)),
        ("mha", [0, 3], 40, None, (2, 40, 4, 4)),
        ("mha", 0.75, None, 3, (3, 64, 3, 3)),
        ("gqa", 2, 0.25, 4, (2, 12, 4, 2)),
        ("gqa", None, 30, 2, (3, 30, 2, 2)),
    ],
)
def test_pruned_shapes_and_parameter_count_are_as_configured(
    name, keep_layers, mlp_keep, heads_keep, shape, calibration
):
    teacher = TEACHERS[name]()
    student = pruned(teacher, keep_layers, mlp_keep, heads_keep, calibration)
    layers, mlp, heads, kv_heads = shape
    config = student.config
    assert type(student) is type(teacher)
    assert (config.num_hidden_layers, config.intermediate_size) == (layers, mlp)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (heads, kv_heads, 8)
    assert len(student.model.layers) == layers
    attention, block = student.model.layers[0].self_attn, student.model.layers[0].mlp
    assert attention.q_proj.weight.shape == (heads * 8, config.hidden_size)
    assert attention.k_proj.weight.shape == (kv_heads * 8, config.hidden_size)
    assert attention.o_proj.weight.shape == (config.hidden_size, heads * 8)
    assert block.down_proj.weight.shape == (config.hidden_size, mlp)
    count = expected_parameters(128, config.hidden_size, layers, heads, kv_heads, 8, mlp)
    assert sum(p.numel() for p in student.parameters()) == count


@pytest.mark.parametrize("name", ["mha", "gqa"])
def test_nothing_pruned_gives_the_teachers_outputs(name, calibration):
    teacher = TEACHERS[name]()
    config = teacher.config
    everything = pruned(
        teacher, config.num_hidden_layers, 1.0, config.num_attention_heads, calibration
    )  # counts equal to the teacher's: a calibration pass, everything kept
    for student in (everything, pruned(teacher)):
        assert student.config.kd_teacher_layers == list(range(config.num_hidden_layers))
        assert torch.allclose(logits(student), logits(teacher), atol=1e-6, rtol=0)


def test_depth_pruning_removes_a_layer_that_does_not_change_its_input(calibration):
    teacher = mha_teacher()
    layer = teacher.model.layers[1]
    with torch.no_grad():  # the residual branches add nothing: layer 1 is the identity
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    importance = measure_importance(teacher, calibration_batches(**calibration))
    assert importance.layers[1] == pytest.approx(0, abs=1e-6)
    assert bool((importance.layers[[0, 2, 3]] > 1e-3).all())
    student = pruned(teacher, keep_layers=3, calibration=calibration)
    assert student.config.kd_teacher_layers == [0, 2, 3]
    assert torch.allclose(logits(student), logits(teacher), atol=1e-5, rtol=0)  # an identity layer is no loss


def test_width_pruning_removes_planted_dead_channels_and_heads(calibration):
    teacher = mha_teacher()
    dead_channels, dead_head = [3, 17, 40, 63], 2
    with torch.no_grad():
        for layer in teacher.model.layers:
            layer.mlp.gate_proj.weight[dead_channels] = 0  # silu(0) * up = 0
            layer.self_attn.v_proj.weight[dead_head * 8 : (dead_head + 1) * 8] = 0  # the head outputs 0
    importance = measure_importance(teacher, calibration_batches(**calibration))
    assert bool((importance.channels[:, dead_channels] == 0).all())
    assert bool((importance.heads[:, dead_head] == 0).all())
    plan = plan_pruning(teacher.config, importance, None, 60, 3)
    alive = [c for c in range(64) if c not in dead_channels]
    assert plan.channels == [alive] * 4 and plan.heads == [[0, 1, 3]] * 4 and plan.kv_heads == plan.heads
    student = pruned(teacher, mlp_keep=60, heads_keep=3, calibration=calibration)
    assert torch.allclose(logits(student), logits(teacher), atol=1e-5, rtol=0)  # dead parts removed: no change


def masked(teacher: LlamaForCausalLM, plan: PrunePlan) -> LlamaForCausalLM:
    """The teacher with every channel and query head ``plan`` drops zeroed in ``down_proj`` / ``o_proj``."""
    model = copy.deepcopy(teacher)
    width = model.config.head_dim
    with torch.no_grad():
        for layer, channels, heads in zip(model.model.layers, plan.channels, plan.heads, strict=True):
            dropped = [c for c in range(model.config.intermediate_size) if c not in channels]
            layer.mlp.down_proj.weight[:, dropped] = 0
            for head in range(model.config.num_attention_heads):
                if head not in heads:
                    layer.self_attn.o_proj.weight[:, head * width : (head + 1) * width] = 0
    return model


@pytest.mark.parametrize(("name", "mlp_keep", "heads_keep"), [("mha", 0.5, 2), ("mha", 20, 1), ("gqa", 0.5, 4)])
def test_width_pruned_model_equals_the_teacher_with_those_channels_and_heads_masked(
    name, mlp_keep, heads_keep, calibration
):
    teacher = TEACHERS[name]()
    importance = measure_importance(teacher, calibration_batches(**calibration))
    plan = plan_pruning(teacher.config, importance, None, mlp_keep, heads_keep)
    if name == "gqa":  # every key/value head kept, each group of 3 query heads keeps 2
        assert plan.kv_heads == [[0, 1]] * 3
        assert all(sorted(h // 3 for h in heads) == [0, 0, 1, 1] for heads in plan.heads)
    student = pruned(teacher, None, mlp_keep, heads_keep, calibration)
    assert all(
        torch.equal(a, b) for a, b in zip(student.parameters(), apply_plan(teacher, plan).parameters(), strict=True)
    )
    assert not torch.allclose(logits(student), logits(teacher), atol=1e-3)  # something was removed ...
    assert torch.allclose(logits(student), logits(masked(teacher, plan)), atol=1e-6, rtol=0)  # ... exactly that


def test_pruned_student_round_trips_through_save_pretrained(tmp_path: Path, calibration):
    student = pruned(gqa_teacher(), 2, 0.5, 2, calibration)
    student.save_pretrained(tmp_path)
    loaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert json.loads((tmp_path / "config.json").read_text())["num_key_value_heads"] == 2
    assert torch.equal(logits(loaded), logits(student))


@pytest.mark.parametrize(
    ("key", "kwargs"),
    [
        ("keep_layers", {"keep_layers": 0}),
        ("keep_layers", {"keep_layers": 5}),
        ("keep_layers", {"keep_layers": 2.5}),
        ("keep_layers", {"keep_layers": "two"}),
        ("keep_layers", {"keep_layers": True}),
        ("keep_layers", {"keep_layers": [0, 0]}),
        ("keep_layers", {"keep_layers": [4]}),
        ("keep_layers", {"keep_layers": []}),
        ("mlp_keep", {"mlp_keep": 0}),
        ("mlp_keep", {"mlp_keep": 65}),
        ("mlp_keep", {"mlp_keep": 1.5}),
        ("mlp_keep", {"mlp_keep": -0.5}),
        ("heads_keep", {"heads_keep": 0}),
        ("heads_keep", {"heads_keep": 5}),
        ("heads_keep", {"heads_keep": 0.5}),
        ("calibration", {"keep_layers": 2}),
        ("calibration.num_examples", {"keep_layers": 2, "calibration": {**CALIBRATION, "num_examples": 0}}),
    ],
)
def test_bad_settings_raise_one_line_naming_the_key(key: str, kwargs: dict) -> None:
    if "calibration" in kwargs:
        kwargs["calibration"] = {**kwargs["calibration"], "tokenizer": char_tokenizer()}
    with pytest.raises(ConfigError) as error:
        pruned(mha_teacher(), **kwargs)
    message = str(error.value)
    assert f"llm.student.{key}" in message and "\n" not in message


def test_grouped_query_heads_keep_must_fill_every_group_alike() -> None:
    with pytest.raises(ConfigError, match=r"llm.student.heads_keep=3: .* multiple of 2"):
        pruned(gqa_teacher(), heads_keep=3)


def test_kd_llm_distill_trains_a_pruned_student(kd_home: Path) -> None:
    run_dir = kd_home / "llm_pruned"
    result = run(
        "kd-llm-distill",
        "llm/teacher=tiny",
        "llm/student=pruned",
        "llm.student.keep_layers=1",
        "llm.student.mlp_keep=0.5",
        "trainer.max_steps=2",
        "+trainer.enable_progress_bar=false",
        "llm.data.train_prompts.num_prompts=16",
        "llm.data.val_prompts.num_prompts=4",
        f"hydra.run.dir={run_dir}",
        home=kd_home,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["metrics"]["val/loss"] > 0
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
