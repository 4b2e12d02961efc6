"""Scale settings that hold on a GPU, checked on CPU: the FSDP wrapping of teacher and student, and the
chunked token loss fed bfloat16 hidden states and heads."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from lightning.pytorch.strategies import FSDPStrategy
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

from kd_lightning.cli.common import CONFIG_DIR
from kd_lightning.engine.errors import ConfigError
from kd_lightning.llm.divergences import ForwardKL
from kd_lightning.llm.models import random_llama
from kd_lightning.llm.sharding import layer_wrapped_fsdp
from kd_lightning.llm.token_loss import TokenDistillationLoss
from kd_lightning.llm.tokens import final_hidden_states
from kd_lightning.methods.lm import TokenKD


def test_fsdp_llm_makes_every_teacher_and_student_layer_its_own_unit() -> None:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("llm_distill", overrides=["trainer=fsdp_llm"])
    strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, FSDPStrategy) and strategy.kwargs["use_orig_params"]
    policy = strategy.kwargs["auto_wrap_policy"]  # Lightning turns the class set into this policy
    assert isinstance(policy, ModuleWrapPolicy)
    teacher, student = random_llama(vocab_size=64, num_layers=4, seed=0), random_llama(vocab_size=64, seed=1)
    module = TokenKD(
        student=student, loss=TokenDistillationLoss(ForwardKL()), teacher=teacher, optimizer=torch.optim.SGD
    )
    units = policy._run_policy(module, set(), {})
    layers = [*module.teacher.model.layers, *module.student.model.layers]
    assert set(layers) <= set(units) and len(layers) == 6  # each teacher layer gathered on its own, then freed
    assert module.teacher not in units and module.teacher.model.embed_tokens not in units  # in the root unit
    with pytest.raises(ConfigError, match="layer_classes"):
        layer_wrapped_fsdp(["transformers.NoSuchLayer"])


def test_chunked_loss_on_bfloat16_inputs_matches_float32() -> None:
    teacher, student = random_llama(vocab_size=99, seed=0), random_llama(vocab_size=99, seed=1)
    ids = torch.randint(3, 99, (3, 20), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, :5] = -100
    loss = TokenDistillationLoss(ForwardKL(temperature=2.0), alpha=0.5, chunk_size=7)
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        s, t = student.to(dtype), teacher.to(dtype)
        s.zero_grad()
        hidden = final_hidden_states(s, ids, mask)
        with torch.no_grad():
            teacher_hidden = final_hidden_states(t, ids, mask)
        out = loss(hidden, s.lm_head, labels, teacher_hidden, t.lm_head)
        assert out.total.dtype == torch.float32  # logits and softmax in float32 whatever the inputs
        out.total.backward()
        results[dtype] = (out.total.item(), s.lm_head.weight.grad.float().clone())
    assert results[torch.bfloat16][0] == pytest.approx(results[torch.float32][0], rel=2e-2)
    grad16, grad32 = results[torch.bfloat16][1], results[torch.float32][1]
    assert torch.isfinite(grad16).all()
    assert torch.nn.functional.cosine_similarity(grad16.flatten(), grad32.flatten(), dim=0) > 0.99
