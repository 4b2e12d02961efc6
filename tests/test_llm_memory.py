"""Memory of LM distillation: activation checkpointing of the student (``llm.student.gradient_checkpointing``),
a 16-bit teacher beside a float32 student (``llm.teacher.dtype``), and the pre-fit peak-memory estimate
(:mod:`kd_lightning.llm.memory`) against the peak measured over a few training steps."""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path

import pytest
import torch
from torch.autograd.graph import saved_tensors_hooks

from kd_lightning.engine.errors import ConfigError
from kd_lightning.llm.divergences import ForwardKL
from kd_lightning.llm.memory import MemoryEstimate, estimate_memory, student_activation_bytes
from kd_lightning.llm.models import cast_teachers, random_llama, teacher_dtype
from kd_lightning.llm.token_loss import TokenDistillationLoss
from kd_lightning.llm.tokens import final_hidden_states
from tests.conftest import compose_config

LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}


def batch(vocab: int, rows: int, length: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask, labels)``: random tokens, the first row padded on its second half."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (rows, length), generator=generator)
    mask = torch.ones(rows, length, dtype=torch.long)
    mask[0, length // 2 :] = 0
    return ids, mask, ids.masked_fill(mask == 0, -100)


def distill_loss(student: torch.nn.Module, teacher: torch.nn.Module, loss: TokenDistillationLoss, data) -> torch.Tensor:
    """The per-token distillation loss of ``student`` on ``data``, as the LM schemes compute it."""
    ids, mask, labels = data
    hidden = final_hidden_states(student, ids, mask)
    with torch.no_grad():
        teacher_hidden = final_hidden_states(teacher, ids, mask)
    head, teacher_head = student.get_output_embeddings(), teacher.get_output_embeddings()
    out = loss(hidden, head, labels, teacher_hidden=teacher_hidden, teacher_head=teacher_head)
    return out.total / out.count


# ---------------------------------------------------------------------------------- checkpointing
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_gradient_checkpointing_keeps_the_loss_and_every_gradient(lora: bool) -> None:
    teacher = random_llama(vocab_size=128, hidden_size=32, num_layers=2, seed=0).requires_grad_(False)
    loss = TokenDistillationLoss(ForwardKL(), alpha=0.5, chunk_size=16)
    data = batch(128, 2, 24)
    results = []
    for checkpointing in (False, True):
        student = random_llama(
            vocab_size=128, hidden_size=32, num_layers=3, seed=1, gradient_checkpointing=checkpointing
        )
        if lora:
            from peft import LoraConfig, get_peft_model

            torch.manual_seed(2)  # the same adapters both times, B != 0 too: every adapter gets a gradient
            student = get_peft_model(student, LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, **LORA))
        student.train()
        value = distill_loss(student, teacher, loss, data)
        value.backward()
        grads = {name: p.grad for name, p in student.named_parameters() if p.requires_grad}
        assert all(grad is not None and grad.abs().sum() > 0 for grad in grads.values())
        results.append((value.detach(), grads, student))
    (plain, plain_grads, _), (checkpointed, checkpointed_grads, student) = results
    assert any(getattr(module, "gradient_checkpointing", False) is True for module in student.modules())
    assert sorted(plain_grads) == sorted(checkpointed_grads) and (not lora or len(plain_grads) == 3 * 2 * 2)
    torch.testing.assert_close(checkpointed, plain, rtol=0, atol=1e-6)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, rtol=0, atol=1e-6, msg=name)


def test_gradient_checkpointing_must_be_a_bool() -> None:
    with pytest.raises(ConfigError, match=r"^llm\.student\.gradient_checkpointing='yes' must be bool"):
        random_llama(vocab_size=64, gradient_checkpointing="yes")


# ----------------------------------------------------------------------------------- teacher dtype
def test_teacher_dtype_names_the_key_of_a_bad_value() -> None:
    assert teacher_dtype(None) is None and teacher_dtype("bfloat16") is torch.bfloat16
    assert teacher_dtype("float16") is torch.float16 and teacher_dtype("float32") is torch.float32
    for bad in ("bf16", "torch.bfloat16", 16, ["bfloat16"]):
        with pytest.raises(ConfigError, match=r"^llm\.teacher\.dtype=.* is not a dtype; use one of bfloat16"):
            teacher_dtype(bad)


def test_a_bfloat16_teacher_trains_a_float32_student_through_the_recipe(
    kd_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import kd_lightning.recipes.llm_distill as recipe

    seen = {}

    def spy(student, teachers, *args, **kwargs) -> MemoryEstimate:
        teachers = list(teachers)
        seen["teacher"] = {p.dtype for teacher in teachers for p in teacher.parameters()}
        seen["student"] = {p.dtype for p in student.parameters()}
        return estimate_memory(student, teachers, *args, **kwargs)

    monkeypatch.setattr(recipe, "estimate_memory", spy)
    overrides = ["llm/teacher=tiny", "llm/student=tiny", "llm.teacher.dtype=bfloat16", "trainer.max_steps=2"]
    overrides += ["+trainer.enable_progress_bar=false", "llm.data.train_prompts.num_prompts=16", "logger=none"]
    overrides += ["llm.data.val_prompts.num_prompts=4", "trainer.accelerator=cpu"]
    summary = recipe.distill(compose_config(tmp_path, overrides, config_name="llm_distill"))
    assert seen == {"teacher": {torch.bfloat16}, "student": {torch.float32}}
    metrics = summary["metrics"]
    assert all(torch.isfinite(torch.tensor(metrics[key])) for key in ("train/loss", "val/loss", "val/kl_to_teacher"))
    lines = [line for line in capsys.readouterr().out.splitlines() if "estimated peak memory per device" in line]
    assert len(lines) == 1 and "weights" in lines[0] and "activations" in lines[0], lines


def test_cast_teachers_casts_modules_and_refuses_a_remote_teacher() -> None:
    teacher = random_llama(vocab_size=64)
    cast_teachers({"teacher": teacher, "remote": object()}, None)
    assert {p.dtype for p in teacher.parameters()} == {torch.float32}
    cast_teachers({"teacher": teacher}, torch.float16)
    assert {p.dtype for p in teacher.parameters()} == {torch.float16}
    with pytest.raises(ConfigError, match=r"^llm\.teacher\.dtype casts in-process teachers, but 'remote'"):
        cast_teachers({"remote": object()}, torch.bfloat16)


# --------------------------------------------------------------------------------- the estimate
def saved_by_first_layer(model: torch.nn.Module, data) -> int:
    """Bytes of the distinct storages the first decoder layer's forward saves for backward, its parameters and
    the tensors every layer shares (rotary ``cos``/``sin``, the attention mask) left out; its input counted."""
    layer = model.model.layers[0]
    shared = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    def before(module, args, kwargs) -> None:
        for value in [*kwargs.get("position_embeddings", ()), kwargs.get("attention_mask")]:
            if isinstance(value, torch.Tensor):
                shared.add(value.untyped_storage().data_ptr())
        hooks.__enter__()

    hooks = saved_tensors_hooks(pack, lambda tensor: tensor)
    handles = [
        layer.register_forward_pre_hook(before, with_kwargs=True),
        layer.register_forward_hook(lambda *_: hooks.__exit__(None, None, None)),
    ]
    try:
        final_hidden_states(model.train(), data[0], data[1])
    finally:
        for handle in handles:
            handle.remove()
    return sum(size for pointer, size in saved.items() if pointer not in shared)


@pytest.mark.parametrize(
    ("kv_heads", "attention"), [(4, "sdpa"), (2, "sdpa"), (2, "eager")], ids=["mha", "gqa", "eager"]
)
def test_the_per_layer_activation_count_is_what_autograd_saves(kv_heads: int, attention: str) -> None:
    """The per-layer count of :func:`student_activation_bytes` (one layer: the difference of 2 and 1 layers)
    equals the bytes autograd keeps for one decoder layer of a padded batch, less the per-token scalars it
    leaves out: the two RMSNorm reciprocal roots and, with SDPA, one attention log-sum-exp per head (float32).
    Grouped queries save as much: keys and values are repeated to every head when a mask is given."""
    hidden, heads, rows, length = 64, 4, 2, 32
    model = random_llama(vocab_size=128, hidden_size=hidden, num_heads=heads, intermediate_size=176)
    if kv_heads != heads:
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(**{**model.config.to_dict(), "num_key_value_heads": kv_heads})
        model = LlamaForCausalLM(config)
    model.set_attn_implementation(attention)
    config = model.config
    fewer = copy.deepcopy(config)
    fewer.num_hidden_layers -= 1
    per_layer = student_activation_bytes(config, rows, length, 4) - student_activation_bytes(fewer, rows, length, 4)
    scalars = (2 + (heads if attention == "sdpa" else 0)) * rows * length * 4
    assert saved_by_first_layer(model, batch(128, rows, length)) == per_layer + scalars


def test_the_estimate_counts_lora_adapters_bf16_teachers_and_checkpointing() -> None:
    from peft import LoraConfig, get_peft_model

    teacher = random_llama(vocab_size=256, hidden_size=64, num_layers=2, seed=0).to(torch.bfloat16)
    student = random_llama(vocab_size=256, hidden_size=32, num_layers=4, seed=1)
    loss = TokenDistillationLoss(ForwardKL(), alpha=0.5, chunk_size=64)
    full = estimate_memory(student, [teacher, object()], student.parameters(), 2, 100, loss)
    weights = sum(p.numel() for p in student.parameters()) * 4 + sum(p.numel() for p in teacher.parameters()) * 2
    buffers = sum(b.numel() * b.element_size() for m in (student, teacher) for b in m.buffers())
    assert full.weights == weights + buffers
    assert full.gradients == sum(p.numel() for p in student.parameters()) * 4 == full.optimizer // 2
    assert full.logits == 64 * 256 * 4 * 5
    assert full.total == full.weights + full.gradients + full.optimizer + full.activations + full.logits
    line = full.describe()
    assert line.startswith("estimated peak memory per device: ") and "\n" not in line and "logits 0.3 MiB" in line

    tempered = TokenDistillationLoss(ForwardKL(temperature=2.0), alpha=0.5, chunk_size=None)
    assert estimate_memory(student, [], [], 2, 100, tempered).logits == 200 * 256 * 4 * 7

    checkpointed = random_llama(vocab_size=256, hidden_size=32, num_layers=4, seed=1, gradient_checkpointing=True)
    saved = estimate_memory(checkpointed, [teacher], checkpointed.parameters(), 2, 100, loss)
    per_layer = 10 * 32 + 4 * 64 + 100
    assert full.activations - saved.activations == (3 * per_layer - 4 * 32) * 200 * 4  # 4 inputs + 1 layer kept

    adapted = get_peft_model(student, LoraConfig(task_type="CAUSAL_LM", **LORA))
    lora = estimate_memory(adapted, [teacher], adapted.parameters(), 2, 100, loss)
    adapters = 4 * 2 * (32 * 4 + 4 * 32)  # layers x (q, v) x (A + B)
    assert lora.gradients == adapters * 4 and lora.optimizer == adapters * 8
    assert lora.activations == full.activations


def measure(hidden: int, layers: int, rows: int, length: int, checkpointing: bool, steps: int = 2) -> dict:
    """Peak tensor memory of ``steps`` training steps (model building included) and the estimate, in bytes.

    Measured from torch's CPU allocator as its profiler reports it: with ``profile_memory=True`` every tensor
    allocation and free is an event (address, bytes); the peak of the bytes allocated since the profiler
    started and not yet freed (:func:`peak_of`) is the CPU analogue of ``torch.cuda.max_memory_allocated``.
    Unlike the process's resident size (``ru_maxrss``) it is exact and repeatable: no interpreter, library
    pages, allocator caching or fragmentation, nor the profiler's own records; and since only allocations
    made while profiling count, no fresh process is needed (the allocator's own running total,
    ``Total Allocated``, is not used: it carries tensors of earlier profiling sessions freed in between).
    Vocabulary 4,096 with 128-token chunks, so the loss's logits count too; the teacher is half the
    student's width and as deep.
    """
    from torch.profiler import ProfilerActivity, profile

    vocab, chunk, intermediate = 4096, 128, hidden * 43 // 16
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        teacher = random_llama(
            vocab_size=vocab,
            hidden_size=hidden // 2,
            num_layers=layers,
            num_heads=8,
            intermediate_size=intermediate // 2,
        ).requires_grad_(False)
        student = random_llama(
            vocab_size=vocab,
            hidden_size=hidden,
            num_layers=layers,
            num_heads=8,
            intermediate_size=intermediate,
            seed=1,
            gradient_checkpointing=checkpointing,
        ).train()
        loss = TokenDistillationLoss(ForwardKL(), alpha=0.5, chunk_size=chunk)
        optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
        for step in range(steps):
            distill_loss(student, teacher, loss, batch(vocab, rows, length, seed=step)).backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    estimate = estimate_memory(student, [teacher], student.parameters(), rows, length, loss)
    with tempfile.TemporaryDirectory() as folder:
        trace = Path(folder) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    peak = peak_of([event for event in events if event.get("name") == "[memory]"])
    parts = {name: getattr(estimate, name) for name in ("weights", "gradients", "optimizer", "activations", "logits")}
    params = sum(p.numel() for p in student.parameters())
    return {"peak": peak, "estimate": estimate.total, "student_params": params, **parts}


def peak_of(events: list[dict]) -> int:
    """The most bytes alive at once among the allocations the profiler's ``[memory]`` events record (an
    allocation's ``Bytes`` is positive, its free's negative, both at its ``Addr``), in time order."""
    live: dict[int, int] = {}
    alive = peak = 0
    for event in sorted(events, key=lambda event: event["ts"]):
        size, address = event["args"]["Bytes"], event["args"]["Addr"]
        if size > 0:
            live[address] = size
            alive += size
            peak = max(peak, alive)
        elif address in live:
            alive -= live.pop(address)
    return peak


@pytest.mark.parametrize(
    "size",
    [
        {"hidden": 256, "layers": 6, "rows": 4, "length": 256, "checkpointing": False},
        {"hidden": 512, "layers": 6, "rows": 4, "length": 128, "checkpointing": False},
        {"hidden": 256, "layers": 6, "rows": 4, "length": 256, "checkpointing": True},
    ],
    ids=["5M", "20M", "5M-checkpointed"],
)
def test_the_estimate_is_within_25_percent_of_the_measured_peak(size: dict) -> None:
    result = measure(**size)
    print(json.dumps({**size, **result, "ratio": round(result["estimate"] / result["peak"], 3)}))
    assert 0.75 <= result["estimate"] / result["peak"] <= 1.25, result
