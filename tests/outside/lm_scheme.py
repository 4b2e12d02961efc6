"""An LM scheme written outside the package: an SFT warm start, then on-policy distillation (GKD starts
from an SFT student). One class here plus one YAML in a config directory of the user's own."""

from __future__ import annotations

from typing import Any

from kd_lightning.llm.divergences import ForwardKL
from kd_lightning.llm.token_loss import TokenDistillationLoss
from kd_lightning.llm.tokens import TokenLossOutput
from kd_lightning.methods.lm import LMMethod, OnPolicy


class WarmStartOnPolicy(OnPolicy):
    """Cross-entropy on the dataset's completions for the first ``warm_steps`` optimizer steps, then
    :class:`~kd_lightning.methods.lm.OnPolicy` with the configured loss. Logs ``train/on_policy_steps``."""

    scheme = "warm_on_policy"

    def __init__(self, *args: Any, warm_steps: int = 1, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.warm_steps = warm_steps
        self.sft = TokenDistillationLoss(ForwardKL(), alpha=0.0, vocab_size=self.loss.vocab_size)

    def warming(self) -> bool:
        return self.training and self.global_step < self.warm_steps

    def training_batch(self, batch: Any, batch_idx: int) -> Any:
        self.log("train/on_policy_steps", float(not self.warming()), reduce_fx="sum", on_step=False, on_epoch=True)
        if self.warming():
            return LMMethod.training_batch(self, batch, batch_idx)
        return super().training_batch(batch, batch_idx)

    def loss_on(self, batch: Any, monitor_kl: bool = False) -> TokenLossOutput:
        return self.one_loss(self.sft, batch, monitor_kl) if self.warming() else super().loss_on(batch, monitor_kl)
