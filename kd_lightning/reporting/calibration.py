"""Calibration of a classifier: expected calibration error and the reliability diagram."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor
from torchmetrics.classification import MulticlassCalibrationError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

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


def reliability_figure(bins: dict[str, ReliabilityBins], ece: dict[str, float]) -> Figure:
    """One column per model: accuracy per confidence bin against the diagonal of perfect calibration, and
    below it the number of samples in each bin (the same y scale for every model), so a bar resting on a
    handful of samples reads as such. The legend sits below the panels, covering nothing."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4.4 * len(bins), 6.0), layout="constrained")
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(2, len(bins), height_ratios=(3, 1))
    first_counts = None
    for column, (name, model_bins) in enumerate(bins.items()):
        ax = figure.add_subplot(grid[0, column])
        counts_ax = figure.add_subplot(grid[1, column], sharex=ax, sharey=first_counts)
        first_counts = first_counts or counts_ax
        n_bins = len(model_bins.count)
        count = model_bins.count.numpy()
        filled = count > 0
        all_centers = ((torch.arange(n_bins) + 0.5) / n_bins).numpy()
        centers = all_centers[filled]
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
        ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy")
        ax.tick_params(labelbottom=False)
        ax.set_title(f"{name}: ECE {100 * ece[name]:.2f}% ({n_bins} bins)")
        counts_ax.bar(
            all_centers, count, width=1 / n_bins, color="0.6", edgecolor="black", linewidth=0.5, label="samples per bin"
        )
        for center, n in zip(all_centers[filled], count[filled], strict=True):
            counts_ax.annotate(
                f"{n:.0f}",
                (center, n),
                xytext=(0, 1.5),
                textcoords="offset points",
                ha="center",
                va="bottom",
                fontsize=6.5 if n < 1000 else 5.5,
                color="0.25",
            )
        counts_ax.set(xlabel="confidence (top-1)", ylabel="samples")
        counts_ax.margins(y=0.22)
    handles, labels = figure.axes[0].get_legend_handles_labels()
    extra, extra_labels = figure.axes[1].get_legend_handles_labels()
    figure.legend(handles + extra, labels + extra_labels, loc="outside lower center", ncol=4, fontsize=9)
    return figure


def plot_reliability(bins: dict[str, ReliabilityBins], ece: dict[str, float], path: Path) -> None:
    """Draws :func:`reliability_figure` and saves it to ``path``."""
    reliability_figure(bins, ece).savefig(path, dpi=120)
