"""Calibration of a classifier: expected calibration error and the reliability diagram."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torchmetrics.classification import MulticlassCalibrationError

#: Equal-width confidence bins on [0, 1] (Guo et al. 2017 use 15).
N_BINS = 15


def expected_calibration_error(logits: Tensor, targets: Tensor, n_bins: int = N_BINS) -> float:
    """ECE of the top-1 predictions: sum over bins of (bin share) x |bin accuracy - bin mean confidence|."""
    metric = MulticlassCalibrationError(num_classes=logits.shape[-1], n_bins=n_bins, norm="l1")
    return float(metric(logits.float().softmax(-1), targets))


@dataclass
class ReliabilityBins:
    """Top-1 predictions grouped into ``n_bins`` equal-width confidence bins on [0, 1]: per bin the mean
    confidence, the accuracy (both 0 where empty) and the number of samples."""

    confidence: Tensor
    accuracy: Tensor
    count: Tensor

    @classmethod
    def of(cls, logits: Tensor, targets: Tensor, n_bins: int = N_BINS) -> ReliabilityBins:
        confidence, prediction = logits.float().softmax(-1).max(-1)
        edges = torch.linspace(0, 1, n_bins + 1)
        index = (torch.bucketize(confidence, edges, right=True) - 1).clamp(0, n_bins - 1)
        count = torch.zeros(n_bins).index_add_(0, index, torch.ones_like(confidence))
        per_bin = count.clamp(min=1)
        conf = torch.zeros(n_bins).index_add_(0, index, confidence) / per_bin
        correct = prediction.eq(targets).float()
        return cls(conf, torch.zeros(n_bins).index_add_(0, index, correct) / per_bin, count)


def plot_reliability(bins: dict[str, ReliabilityBins], ece: dict[str, float], path: Path) -> None:
    """One panel per model: accuracy per confidence bin against the diagonal of perfect calibration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(bins), figsize=(4.2 * len(bins), 4.2), squeeze=False)
    for ax, (name, model_bins) in zip(axes[0], bins.items(), strict=True):
        n_bins = len(model_bins.count)
        filled = (model_bins.count > 0).numpy()
        centers = ((torch.arange(n_bins) + 0.5) / n_bins).numpy()[filled]
        accuracy, confidence = model_bins.accuracy.numpy()[filled], model_bins.confidence.numpy()[filled]
        ax.bar(centers, accuracy, width=1 / n_bins, edgecolor="black", label="accuracy")
        ax.bar(
            centers,
            abs(confidence - accuracy),
            bottom=np.minimum(accuracy, confidence),
            width=1 / n_bins,
            facecolor=(0.84, 0.15, 0.16, 0.25),
            edgecolor="tab:red",
            hatch="//",
            linewidth=0,
            label="gap to mean confidence",
        )
        ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top-1)", ylabel="accuracy")
        ax.set_title(f"{name}: ECE {100 * ece[name]:.2f}% ({n_bins} bins)")
        ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
