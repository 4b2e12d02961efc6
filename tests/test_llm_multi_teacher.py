"""Several LM teachers: per-row routing (each row reaches its own teacher only) and per-token mixtures,
against single-teacher references; the data's teacher column; configs and errors; a CLI run."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

from kd_lightning.cli.common import CONFIG_DIR
from kd_lightning.engine.errors import ConfigError
from kd_lightning.llm.data import LLMDataModule
from kd_lightning.llm.divergences import ForwardKL
from kd_lightning.llm.models import char_tokenizer, random_llama
from kd_lightning.llm.teacher_combinations import RowRouting, TokenMixture, select_rows
from kd_lightning.llm.token_loss import TokenDistillationLoss
from kd_lightning.llm.tokens import final_hidden_states
from kd_lightning.methods.lm import MultiTeacher
from kd_lightning.recipes.llm_components import build_teachers
from tests.test_cli import run
from tests.test_llm_module import changed, fit, snapshot

NAMES = ["math", "chat"]


def routed_data(tmp_path: Path, routing: RowRouting, **kwargs) -> LLMDataModule:
    """Arithmetic and instruction records; one instruction record names the math teacher itself."""
    records = [
        {"prompt": "What is 2 plus 2?", "completion": "The answer is 4.", "kind": "arithmetic"},
        {"prompt": "Write about rain.", "completion": "Rain falls.", "kind": "instructions"},
        {"prompt": "What is 3 times 3?", "completion": "The answer is 9.", "kind": "arithmetic"},
        {"prompt": "Describe snow.", "completion": "Snow is white.", "kind": "instructions", "teacher": "math"},
        {"prompt": "Write about cats.", "completion": "Cats nap.", "kind": "instructions"},
    ]
    path = tmp_path / "routed.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    routing.bind(NAMES)
    return LLMDataModule(
        char_tokenizer(), train_file=str(path), val_file=str(path), batch_size=5, routing=routing, **kwargs
    )


def test_rows_name_their_teacher_by_column_or_kind(tmp_path: Path) -> None:
    data = routed_data(tmp_path, RowRouting(by_kind={"arithmetic": "math", "instructions": "chat"}))
    batch = next(iter(data.val_dataloader()))
    assert batch["teacher_index"].tolist() == [0, 1, 0, 0, 1]  # the record's own field wins over its kind
    with pytest.raises(ConfigError, match="by_kind"):
        routed_data(tmp_path, RowRouting(by_kind={"arithmetic": "math"})).setup()
    with pytest.raises(ConfigError, match=r"not in llm\.teacher\.teachers"):
        RowRouting(by_kind={"arithmetic": "nobody"}).bind(NAMES)


def test_routing_sends_each_row_to_its_teacher_only_and_sums_their_losses(tmp_path: Path) -> None:
    routing = RowRouting(by_kind={"arithmetic": "math", "instructions": "chat"})
    batch = next(iter(routed_data(tmp_path, routing).val_dataloader()))
    teachers = {
        "math": random_llama(vocab_size=128, seed=0),
        "chat": random_llama(vocab_size=128, hidden_size=48, num_heads=4, seed=3),
    }
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in NAMES}
    for name, teacher in teachers.items():
        decoder = teacher.get_decoder()
        forward = decoder.forward
        decoder.forward = functools.partial(
            lambda f, n, *a, **k: seen[n].append(k["input_ids"]) or f(*a, **k), forward, name
        )
    student = random_llama(vocab_size=128, seed=1)
    hidden = final_hidden_states(student, batch["input_ids"], batch["attention_mask"])
    losses = {name: TokenDistillationLoss(ForwardKL(), alpha=0.5, vocab_size=99) for name in NAMES}
    out = routing.loss(hidden, student.lm_head, batch, teachers, losses, monitor_kl=True)
    for index, name in enumerate(NAMES):
        rows = (batch["teacher_index"] == index).nonzero().squeeze(1)
        (ids,) = seen[name]
        assert torch.equal(ids, batch["input_ids"][rows])  # this teacher's rows, nothing else
    # reference: each teacher's loss on its own rows, computed separately and added
    total = count = 0
    for index, name in enumerate(NAMES):
        sub = select_rows(batch, (batch["teacher_index"] == index).nonzero().squeeze(1))
        with torch.no_grad():
            teacher_hidden = final_hidden_states(teachers[name], sub["input_ids"], sub["attention_mask"])
        single = losses[name](
            hidden[batch["teacher_index"] == index],
            student.lm_head,
            sub["labels"],
            teacher_hidden,
            teachers[name].lm_head,
            monitor_kl=True,
        )
        total, count = total + single.total, count + single.count
        assert out.parts[f"distill/{name}"] == pytest.approx(single.parts["distill"].item())
        assert out.parts[f"kl_to_teacher/{name}"] == pytest.approx(single.parts["kl_to_teacher"].item())
    assert out.total.item() == pytest.approx(total.item(), rel=1e-6) and out.count == count


def test_mixture_logits_are_the_weighted_tempered_mixture() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = [torch.randn(3, 5, 7, generator=generator) for _ in NAMES]
    fixed = TokenMixture(weights={"math": 1.0, "chat": 3.0})
    fixed.bind(NAMES)
    mixed = fixed.mixture_logits(logits, temperature=2.0)
    expected = 0.25 * F.softmax(logits[0] / 2, -1) + 0.75 * F.softmax(logits[1] / 2, -1)
    torch.testing.assert_close(F.softmax(mixed / 2.0, -1), expected)
    confident = TokenMixture(confidence=True)
    confident.bind(NAMES)
    top = [F.softmax(z, -1).amax(-1, keepdim=True) for z in logits]
    expected = (top[0] * F.softmax(logits[0], -1) + top[1] * F.softmax(logits[1], -1)) / (top[0] + top[1])
    torch.testing.assert_close(F.softmax(confident.mixture_logits(logits, 1.0), -1), expected)
    with pytest.raises(ConfigError, match="every teacher"):
        TokenMixture(weights={"math": 1.0}).bind(NAMES)
    with pytest.raises(ConfigError, match="not both"):
        TokenMixture(weights={"math": 1.0, "chat": 1.0}, confidence=True)


def test_module_distils_from_a_mixture_and_reports_each_teacher(tmp_path: Path) -> None:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("llm_distill", overrides=["llm/teacher=mixture_tiny"])
    teachers = build_teachers(cfg.llm.teacher)
    assert list(teachers.models) == ["small", "large"] and isinstance(teachers.combination, TokenMixture)
    student = random_llama(vocab_size=128, seed=1)
    data = LLMDataModule(
        teachers.tokenizers["small"],
        train_prompts={"kind": "arithmetic", "num_prompts": 8, "seed": 0},
        val_prompts={"kind": "arithmetic", "num_prompts": 4, "seed": 0, "split": "heldout"},
        batch_size=4,
    )
    module = MultiTeacher(
        student=student,
        loss=TokenDistillationLoss(ForwardKL(), alpha=0.5, vocab_size=99),
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-2),
        teachers=teachers.models,
        combination=teachers.combination,
        pad_token_id=2,
        eos_token_id=2,
    )
    before = {name: snapshot(m) for name, m in teachers.models.items()}
    before_student = snapshot(student)
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = fit(module, data, tmp_path, max_steps=2, enable_checkpointing=True, callbacks=[checkpoint])
    assert changed(before_student, student)
    assert not any(changed(before[name], m) for name, m in teachers.models.items())
    metrics = trainer.callback_metrics
    assert {"val/kl_to_teacher/small", "val/kl_to_teacher/large", "val/kl_to_teacher"} <= set(metrics)
    assert metrics["val/kl_to_teacher/small"] != metrics["val/kl_to_teacher/large"]
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimized and not optimized & {id(p) for m in teachers.models.values() for p in m.parameters()}
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["state_dict"]
    assert state and not any(key.startswith("teacher_") for key in state)  # frozen teachers stay out


def test_kd_llm_distill_routes_rows_between_two_teachers(kd_home: Path) -> None:
    run_dir = kd_home / "llm_cli" / "routed"
    data = routed_data(kd_home, RowRouting())  # writes routed.jsonl: both kinds of rows
    result = run(
        "kd-llm-distill",
        "llm/method=multi_teacher",
        "llm/teacher=routed_tiny",
        "llm/student=tiny",
        "llm/data=teacher_text",
        f"llm.data.train_file={data.sources['train'][0]}",
        f"llm.data.val_file={data.sources['val'][0]}",
        "trainer.max_steps=2",
        "+trainer.enable_progress_bar=false",
        f"hydra.run.dir={run_dir}",
        home=kd_home,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["metrics"]["val/kl_to_teacher/math"] > 0 and summary["metrics"]["val/kl_to_teacher/chat"] > 0
    assert summary["details"]["params/teacher/chat"] != summary["details"]["params/teacher/math"]


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["llm/teacher=mixture_tiny", "llm/student=bpe_llama", "llm/loss=gold"], "route rows instead"),
        (["llm/teacher=routed_tiny", "llm/student=tiny", "llm/teacher_cache=top_k"], "runs the teachers live"),
        (["llm/teacher=routed_tiny", "llm/student=tiny", "llm.loss.alpha=0"], "distils nothing"),
        (["llm/teacher=routed_tiny", "llm/student=tiny", "llm/method=token_kd"], "llm/method=multi_teacher"),
    ],
    ids=["mixture_across_tokenizers", "cache", "sft", "not_multi_teacher"],
)
def test_multi_teacher_config_errors(overrides: list[str], match: str, kd_home: Path) -> None:
    run_dir = kd_home / "llm_cli" / "multi_bad"
    tiny = ["llm.student.hidden_size=32", "llm.student.num_layers=1"] if "llm/student=bpe_llama" in overrides else []
    method = [] if any(o.startswith("llm/method=") for o in overrides) else ["llm/method=multi_teacher"]
    args = [*method, *overrides, *tiny, "llm/data=arithmetic", f"hydra.run.dir={run_dir}"]
    result = run("kd-llm-distill", *args, home=kd_home)
    assert result.returncode == 2 and match in result.stderr, result.stderr[-2000:]
