"""method=mutual: peers learn from each other's detached outputs, one forward each, end to end."""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import pytest
import torch
from torch import nn

from kd_lightning.engine.errors import ConfigError
from kd_lightning.losses import DistillationLoss, FitNets, KLDivergence
from kd_lightning.methods import MutualLearning
from kd_lightning.methods.mutual import soft_mixture
from kd_lightning.recipes.distill import distill
from tests.conftest import TINY, compose_config


def method(peers: int = 1, loss: DistillationLoss | None = None) -> MutualLearning:
    torch.manual_seed(0)
    return MutualLearning(
        student=nn.Linear(6, 3),
        peers={f"peer_{k + 1}": nn.Linear(6, 3) for k in range(peers)},
        loss=loss or DistillationLoss({"kd": KLDivergence()}, alpha=0.5, temperature=1.0),
        optimizer=partial(torch.optim.SGD, lr=0.1),
        num_classes=3,
    )


def test_each_peer_gets_gradients_from_its_own_loss_only_one_forward_each() -> None:
    module = method(peers=2)
    calls: list[str] = []
    for name, model in module.models().items():
        model.register_forward_hook(lambda *_, name=name: calls.append(name))
    x, y = torch.randn(8, 6), torch.randint(3, (8,))
    module.training_step((x, y), 0).backward()
    assert sorted(calls) == ["peer_1", "peer_2", "student"]  # one forward per peer per step
    grads = {name: m.weight.grad.clone() for name, m in module.models().items()}
    # Peer 1's gradient is that of its own loss alone: the others' outputs are detached targets.
    module.zero_grad()
    logits = {name: m(x) for name, m in module.models().items()}
    target = soft_mixture([logits["student"].detach(), logits["peer_2"].detach()], 1.0)
    own = module.loss({"student": {"logits": logits["peer_1"]}, "teacher": {"logits": target}}, y).total
    own.backward()
    torch.testing.assert_close(module.peers["peer_1"].weight.grad, grads["peer_1"])


def test_two_peers_use_the_papers_kl_to_the_other() -> None:
    z = torch.randn(4, 3)
    torch.testing.assert_close(torch.softmax(soft_mixture([z], 2.0) / 2.0, -1), torch.softmax(z / 2.0, -1))


def test_feature_losses_and_missing_peers_are_refused() -> None:
    with pytest.raises(ConfigError, match="exchanges logits between peers"):
        method(loss=DistillationLoss({"fitnet": FitNets(student_layer="a", teacher_layer="b")}, alpha=0.5))
    with pytest.raises(ConfigError, match="at least one peer"):
        method(peers=0)


def test_mutual_learning_runs_end_to_end_with_every_peer_checkpointed(tmp_path: Path, kd_home: Path) -> None:
    summary = distill(compose_config(tmp_path / "run", [*TINY, "method=mutual", "logger=none"]))
    metrics = summary["metrics"]
    for key in ("val/acc", "val/acc/peer_1", "val/acc_ensemble", "val/agreement", "train/loss_kd", "test/acc"):
        assert 0.0 <= metrics[key] < math.inf, key
    assert summary["teacher_params"] is None and summary["scratch"] is not None  # compared with the student alone
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert any(k.startswith("peers.peer_1.") for k in state) and any(k.startswith("student.") for k in state)
    # each peer's accuracy and the ensemble's, at test (best-val checkpoint) too, in the summary's table
    for key in ("test/acc/peer_1", "test/acc_ensemble"):
        assert 0.0 <= metrics[key] <= 1.0, key
    text = (tmp_path / "run" / "summary.md").read_text()
    for row in ("peer peer_1 test acc", "peer peer_1 val acc", "peer ensemble test acc", "peer ensemble val acc"):
        assert f"| {row} |" in text, row


def test_one_optimizer_per_peer_makes_the_same_updates_as_one_over_all(tmp_path: Path, kd_home: Path) -> None:
    common = [*TINY, "method=mutual", "logger=none", "compare_scratch=false", "trainer.deterministic=true"]
    common.append("scheduler=cosine")
    runs = {
        per_peer: distill(compose_config(tmp_path / str(per_peer), [*common, f"method.optimizer_per_peer={per_peer}"]))
        for per_peer in (False, True)
    }
    weights = {k: torch.load(r["best_checkpoint"], weights_only=True) for k, r in runs.items()}
    assert len(weights[True]["optimizer_states"]) == 2 and len(weights[False]["optimizer_states"]) == 1
    assert len(weights[True]["lr_schedulers"]) == 2
    one, per_peer = weights[False]["state_dict"], weights[True]["state_dict"]
    assert one.keys() == per_peer.keys() and all(torch.equal(one[k], per_peer[k]) for k in one)
    for key in ("train/loss", "val/acc", "val/acc_ensemble", "test/acc"):
        assert runs[True]["metrics"][key] == runs[False]["metrics"][key], key
