"""The validation metrics every LM scheme logs, as a mixin of :class:`~kd_lightning.methods.lm.LMMethod`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torchmetrics import MeanMetric

from kd_lightning.llm.tokens import TokenLossOutput


class TokenMetrics:
    """``val/loss`` (per token), ``val/ppl`` (the student's perplexity on the validation completions),
    ``val/kl_to_teacher`` (forward KL at T = 1 per token) and ``val/kl_to_teacher/<name>`` per teacher of
    :attr:`val_teacher_kl`, each weighted by tokens and synchronised across ranks by torchmetrics."""

    log: Any
    loss_on: Any

    def init_metrics(self) -> None:
        self.val_loss, self.val_ce, self.val_kl = MeanMetric(), MeanMetric(), MeanMetric()
        self.val_teacher_kl = nn.ModuleDict()

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        out: TokenLossOutput = self.loss_on(batch, monitor_kl=True)
        tokens = out.count.clamp(min=1).float()
        self.val_loss.update(out.total / tokens, weight=out.count.float())
        self.val_ce.update(out.parts["ce"] / tokens, weight=out.count.float())
        if "kl_to_teacher" in out.parts:
            self.val_kl.update(out.parts["kl_to_teacher"] / tokens, weight=out.count.float())
        for name, metric in self.val_teacher_kl.items():
            if f"kl_to_teacher/{name}" in out.parts:
                count = out.parts[f"tokens/{name}"]
                metric.update(out.parts[f"kl_to_teacher/{name}"] / count.clamp(min=1), weight=count)

    def on_validation_epoch_end(self) -> None:
        # torchmetrics syncs across ranks in compute(); the values are then equal on every rank.
        self.log("val/loss", self.val_loss.compute(), prog_bar=True, sync_dist=True)
        self.log("val/ppl", torch.exp(self.val_ce.compute()), prog_bar=True, sync_dist=True)
        if self.val_kl.update_called:
            self.log("val/kl_to_teacher", self.val_kl.compute(), sync_dist=True)
        for name, metric in self.val_teacher_kl.items():
            if metric.update_called:
                self.log(f"val/kl_to_teacher/{name}", metric.compute(), sync_dist=True)
        for metric in (self.val_loss, self.val_ce, self.val_kl, *self.val_teacher_kl.values()):
            metric.reset()
