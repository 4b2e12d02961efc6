r"""The mixture of several teachers' distributions as logits, shared by the classifier and LM halves.

.. math:: z_{mix} = T \log \sum_k w_k\, \mathrm{softmax}(z_k / T)

whose tempered softmax is exactly :math:`\sum_k w_k\, \mathrm{softmax}(z_k / T)`, so every loss that
softens logits by :math:`T` reads the mixture as one teacher (Hinton et al. 2015's ensemble target;
Fukuda et al. 2017; CA-MKD's per-sample weights, Zhang et al. 2022).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def mixture_logits(logits: Tensor, log_weights: Tensor, temperature: float) -> Tensor:
    """``T log sum_k w_k softmax(z_k / T)`` over the first dimension of ``logits`` ``[K, ..., V]`` (float32 or
    wider); ``log_weights`` ``[K, ...]`` (without the class dimension) sum to one over ``K`` in probability."""
    log_p = F.log_softmax(logits.float() / temperature, dim=-1)
    return temperature * torch.logsumexp(log_weights.unsqueeze(-1) + log_p, dim=0)
