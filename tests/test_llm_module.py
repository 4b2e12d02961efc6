"""The LM schemes (kd_lightning.methods.lm) end to end with tiny random Llamas: frozen teacher, normalisation,
cache, configs."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM

from kd_lightning.cli.common import CONFIG_DIR
from kd_lightning.engine.errors import ConfigError
from kd_lightning.llm.divergences import DIVERGENCES, ForwardKL, GeneralizedJSD
from kd_lightning.llm.logit_cache import LogitCache
from kd_lightning.llm.teacher_rows import teacher_top_k
from kd_lightning.llm.token_loss import TokenDistillationLoss
from kd_lightning.methods.lm import SFT, LMMethod, OnPolicy, TokenKD, sampled_batch
from kd_lightning.recipes.llm_components import scheme_factory
from tests.conftest import tiny_trainer

VOCAB, PAD, EOS = 128, 0, 2


def tiny_llama(seed: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        pad_token_id=PAD,
        eos_token_id=EOS,
        bos_token_id=1,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def examples(count: int, seed: int) -> list[dict[str, list[int]]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        prompt = rng.integers(3, VOCAB, rng.integers(2, 6)).tolist()
        completion = [*rng.integers(3, VOCAB, rng.integers(1, 6)).tolist(), EOS]
        out.append({"prompt": prompt, "completion": completion})
    return out


def collate(rows: list[dict[str, list[int]]], prompt_only: bool = False) -> dict[str, torch.Tensor]:
    """Right-padded prompt + completion (completion labelled) and left-padded prompts, like llm.data."""
    width = max(len(r["prompt"]) for r in rows)
    batch = {
        "prompt_input_ids": torch.tensor([[PAD] * (width - len(r["prompt"])) + r["prompt"] for r in rows]),
        "prompt_attention_mask": torch.tensor(
            [[0] * (width - len(r["prompt"])) + [1] * len(r["prompt"]) for r in rows]
        ),
    }
    if prompt_only:
        return batch
    width = max(len(r["prompt"]) + len(r["completion"]) for r in rows)
    ids = torch.full((len(rows), width), PAD)
    mask, labels = torch.zeros_like(ids), torch.full_like(ids, -100)
    for i, r in enumerate(rows):
        n, m = len(r["prompt"]), len(r["prompt"]) + len(r["completion"])
        ids[i, :m] = torch.tensor(r["prompt"] + r["completion"])
        mask[i, :m] = 1
        labels[i, n:m] = torch.tensor(r["completion"])
    return {**batch, "input_ids": ids, "attention_mask": mask, "labels": labels}


class TinyData(L.LightningDataModule):
    def __init__(self, prompt_only: bool = False, batch_size: int = 4) -> None:
        super().__init__()
        self.train, self.val = examples(12, 0), examples(4, 1)
        self.prompt_only, self.batch_size = prompt_only, batch_size

    def train_dataloader(self) -> DataLoader:
        fn = functools.partial(collate, prompt_only=self.prompt_only)
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True, collate_fn=fn)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=4, collate_fn=collate)


def make_module(alpha: float = 0.5, teacher: bool = True, **kwargs) -> LMMethod:
    """The scheme the arguments ask for: SFT (alpha 0, no teacher), OnPolicy (lmbda), else TokenKD."""
    loss = TokenDistillationLoss(kwargs.pop("divergence", ForwardKL()), alpha=alpha, chunk_size=8)
    common = {"student": tiny_llama(1), "optimizer": functools.partial(torch.optim.AdamW, lr=1e-2)}
    common["teacher"] = tiny_llama(0) if teacher else None
    if alpha == 0 and not teacher and "lmbda" not in kwargs:
        return SFT(**common, chunk_size=8, **kwargs)
    if "lmbda" in kwargs:
        return OnPolicy(**common, loss=loss, pad_token_id=PAD, eos_token_id=EOS, **kwargs)
    return TokenKD(**common, loss=loss, **kwargs)


def fit(module: LMMethod, data: L.LightningDataModule, tmp_path: Path, **trainer) -> L.Trainer:
    options = {"max_steps": 3, "default_root_dir": str(tmp_path), "num_sanity_val_steps": 0, **trainer}
    trainer = tiny_trainer(**options)
    trainer.fit(module, datamodule=data)
    return trainer


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def changed(before: dict[str, torch.Tensor], model: torch.nn.Module) -> bool:
    return any(not torch.equal(before[name], p) for name, p in model.named_parameters())


# ---------------------------------------------------------------------------------- modes
def test_off_policy_trains_student_only_and_keeps_teacher_out_of_checkpoints(tmp_path: Path) -> None:
    module = make_module()
    student, teacher = snapshot(module.student), snapshot(module.teacher)
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = fit(module, TinyData(), tmp_path, enable_checkpointing=True, callbacks=[checkpoint])
    assert changed(student, module.student) and not changed(teacher, module.teacher)
    assert not module.teacher.training and not any(p.requires_grad for p in module.teacher.parameters())
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimized and not optimized & {id(p) for p in module.teacher.parameters()}
    assert {"val/loss", "val/ppl", "val/kl_to_teacher", "train/loss_distill"} <= set(trainer.callback_metrics)
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["state_dict"]
    assert state and not any(name.startswith("teacher.") for name in state)
    restored = make_module()
    restored.on_load_checkpoint({"state_dict": state})
    assert any(name.startswith("teacher.") for name in state)  # put back from memory, so strict loading works
    restored.load_state_dict(state)


def test_on_policy_samples_from_the_student_and_trains(tmp_path: Path) -> None:
    module = make_module(alpha=1.0, divergence=GeneralizedJSD(beta=0.5), lmbda=1.0, generation={"max_new_tokens": 4})
    student = snapshot(module.student)
    seen = []
    original = module.sample

    def recording(batch, batch_idx):
        seen.append((batch, original(batch, batch_idx)))
        return seen[-1][1]

    module.sample = recording
    fit(module, TinyData(prompt_only=True), tmp_path, max_steps=2)
    assert len(seen) == 2 and changed(student, module.student)
    for prompts, sampled in seen:
        width = prompts["prompt_input_ids"].shape[1]
        assert torch.equal(sampled["input_ids"][:, :width], prompts["prompt_input_ids"])
        labelled = sampled["labels"] != -100
        assert not labelled[:, :width].any() and labelled.any()  # only sampled tokens are trained on
        assert not (labelled & ~sampled["attention_mask"].bool()).any()
    # the same seed, epoch and batch sample the same tokens
    batch = collate(examples(2, 5), prompt_only=True)
    first, second = module.sample(batch, 0), module.sample(batch, 0)
    assert first.pop("token_source") == second.pop("token_source") == "student"
    torch.testing.assert_close(first, second)


def test_sampled_batch_labels_generated_tokens_up_to_eos() -> None:
    prompt = torch.tensor([[0, 5, 6], [7, 8, 9]])
    prompt_mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    sequences = torch.cat([prompt, torch.tensor([[11, EOS, 12], [13, 14, 15]])], dim=1)
    batch = sampled_batch(prompt, prompt_mask, sequences, torch.tensor([EOS]), PAD)
    assert batch["labels"].tolist() == [[-100, -100, -100, 11, EOS, -100], [-100, -100, -100, 13, 14, 15]]
    assert batch["attention_mask"].tolist() == [[0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]
    assert batch["input_ids"][0, -1] == PAD


def test_sft_runs_without_a_teacher(tmp_path: Path) -> None:
    module = make_module(alpha=0.0, teacher=False)
    trainer = fit(module, TinyData(), tmp_path, max_steps=2)
    assert "val/kl_to_teacher" not in trainer.callback_metrics
    assert float(trainer.callback_metrics["train/loss_distill"]) == 0.0


def test_lora_trains_adapters_only(tmp_path: Path) -> None:
    module = make_module(lora={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]})
    trainable = [name for name, p in module.student.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    fit(module, TinyData(), tmp_path, max_steps=1)


def test_teacher_cache_mode(tmp_path: Path) -> None:
    data, teacher = TinyData(), tiny_llama(0).eval()
    cache = LogitCache.build(
        teacher, [data.train_dataloader(), data.val_dataloader()], tmp_path, top_k=8, temperature=1.0, vocab_size=VOCAB
    )
    # content-keyed: a shuffled, differently batched loader finds the same rows as running the teacher
    batch = collate(list(reversed(data.train[:3])))
    direct, cached = teacher_top_k(teacher, batch, 8, 1.0, VOCAB), cache.lookup(batch)
    torch.testing.assert_close(cached.ids, direct.ids)
    exact, decoded = (torch.cat([top.log_probs, top.tail[:, None]], 1) for top in (direct, cached))
    assert (exact.exp() * (exact - decoded)).sum(-1).max() < 1e-3  # 64 levels on disk (cache_codec)
    torch.testing.assert_close(cached.tail, direct.tail, atol=2e-3, rtol=1e-3)  # float16 on disk
    module = make_module(teacher=False, logit_cache=cache)
    student = snapshot(module.student)
    trainer = fit(module, data, tmp_path)
    assert changed(student, module.student) and "val/kl_to_teacher" in trainer.callback_metrics


def test_logit_cache_is_verified_on_read(tmp_path: Path) -> None:
    data, teacher = TinyData(), tiny_llama(0)
    build = functools.partial(LogitCache.build, teacher, [data.val_dataloader()], tmp_path, temperature=1.0)
    cache = build(top_k=4, vocab_size=VOCAB)
    assert build(top_k=4, vocab_size=VOCAB).path == cache.path  # reused, same key
    assert build(top_k=5, vocab_size=VOCAB).path != cache.path
    with pytest.raises(ConfigError, match="top_k"):
        LogitCache(cache.path, {"top_k": 6})
    with pytest.raises(ConfigError, match="not in the logit cache"):
        cache.lookup(collate(examples(2, 99)))
    tail = cache.path / "tail.npy"
    tail.write_bytes(tail.read_bytes()[:-4] + b"\0\0\0\1")
    with pytest.raises(ConfigError, match="corrupt"):
        LogitCache(cache.path)
    meta = json.loads((cache.path / "meta.json").read_text())
    (cache.path / "meta.json").write_text(json.dumps({**meta, "num_tokens": meta["num_tokens"] + 1}))
    with pytest.raises(ConfigError, match="shape"):
        LogitCache(cache.path, verify=False)


# --------------------------------------------------------------------------- normalisation
def test_gradient_accumulation_normalises_by_all_tokens_of_the_step(tmp_path: Path) -> None:
    """Two micro-batches with 1 and 3 examples (different token counts) accumulated = one batch of all 4."""
    rows = examples(4, 7)
    one_batch = [collate(rows)]
    micro = [collate(rows[:1]), collate(rows[1:])]
    assert (micro[0]["labels"] != -100).sum() != (micro[1]["labels"] != -100).sum()

    def step(batches, accumulate: int) -> dict[str, torch.Tensor]:
        module = make_module()
        module.optimizer_factory = functools.partial(torch.optim.SGD, lr=1.0)
        fit(module, _Fixed(batches), tmp_path, max_steps=1, accumulate_grad_batches=accumulate, limit_val_batches=0)
        return snapshot(module.student)

    whole, accumulated = step(one_batch, 1), step(micro, 2)
    reference = make_module()  # by hand: one SGD step (lr 1) on the per-token mean of the whole batch
    out = reference.loss_on(one_batch[0])
    (out.total / out.count).backward()
    expected = {name: p.detach() - p.grad for name, p in reference.student.named_parameters()}
    for name, value in whole.items():
        torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(accumulated[name], value, rtol=1e-5, atol=1e-6)


class _Fixed(L.LightningDataModule):
    def __init__(self, batches: list[dict[str, torch.Tensor]]) -> None:
        super().__init__()
        self.batches = batches

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.batches, batch_size=None)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.batches, batch_size=None)


# ---------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"alpha": 0.5, "teacher": False}, "needs a teacher"),
        ({"alpha": 0.0, "lmbda": 0.5}, "alpha > 0"),
        ({"lmbda": 1.5}, "lmbda"),
        ({"lmbda": 0.0}, "llm/method=token_kd"),
        ({"alpha": 0.0}, "llm/method=sft"),
    ],
)
def test_module_config_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        make_module(**kwargs)


def test_prompt_only_batches_need_lambda_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="prompt_only"):
        fit(make_module(lmbda=0.5), TinyData(prompt_only=True), tmp_path, max_steps=4)
    with pytest.raises(ConfigError, match="prompt_only"):
        fit(make_module(), TinyData(prompt_only=True), tmp_path, max_steps=1)


# ---------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("loss", sorted(DIVERGENCES))
def test_loss_configs_compose_and_build(loss: str) -> None:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("llm_distill", overrides=[f"llm/loss={loss}"], return_hydra_config=False)
    built = instantiate(cfg.llm.loss)
    assert isinstance(built, TokenDistillationLoss)
    assert isinstance(built.divergence, DIVERGENCES[loss])


METHODS = {"token_kd": TokenKD, "sft": SFT, "on_policy": OnPolicy}


@pytest.mark.parametrize("method", sorted(p.stem for p in (Path(CONFIG_DIR) / "llm" / "method").glob("*.yaml")))
def test_method_configs_compose_and_name_their_scheme(method: str) -> None:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("llm_distill", overrides=[f"llm/method={method}"])
    factory, loss_cfg = scheme_factory(cfg)
    assert (loss_cfg is None) == (method == "sft")
    assert issubclass(factory.func, LMMethod) and factory.func.config_name() == method
    if method in METHODS:
        assert factory.func is METHODS[method]
    if "lmbda" in cfg.llm.method:
        assert 0.0 <= cfg.llm.method.lmbda <= 1.0
    assert cfg.trainer._target_ and cfg.callbacks.model_checkpoint.monitor == "val/loss"


@pytest.mark.parametrize("cache", ["none", "top_k"])
def test_teacher_cache_configs_compose(cache: str) -> None:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("llm_distill", overrides=[f"llm/teacher_cache={cache}"])
    assert bool(cfg.llm.teacher_cache) == (cache == "top_k")
    if cache == "top_k":
        assert instantiate(cfg.llm.teacher_cache).top_k >= 1


def test_head_check_rejects_scaled_logits(tmp_path: Path) -> None:
    module = make_module()
    forward = module.student.forward

    def scaled(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.logits = out.logits * 2
        return out

    module.student.forward = scaled
    with pytest.raises(ConfigError, match="lm_head"):
        fit(module, TinyData(), tmp_path, max_steps=1)


def test_a_diverged_lm_step_names_this_tools_keys(tmp_path: Path) -> None:
    """The non-finite stop of an LM scheme advises keys kd-llm-distill has (llm.nonfinite), not kd-distill's."""
    module = make_module()
    forward = module.loss_on

    def poisoned(batch, monitor_kl=False):
        out = forward(batch, monitor_kl)
        return out._replace(total=out.total * float("nan"))

    module.loss_on = poisoned
    with pytest.raises(ConfigError, match="non-finite") as error:
        fit(module, TinyData(), tmp_path, max_steps=1)
    assert "llm.nonfinite=skip" in str(error.value) and "runtime.nonfinite" not in str(error.value)
