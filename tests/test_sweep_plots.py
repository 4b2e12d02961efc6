"""Plots that read at a glance, on fake multirun folders (no training): a grid sweep is a heatmap with the
best cell marked and only jobs that ran and failed labelled "failed"; an Optuna-like search is its trials
over the two parameters plus the metric per trial, with short tick labels; the reliability diagram has a
samples-per-bin panel and a legend that covers nothing."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from matplotlib.collections import PathCollection
from matplotlib.image import AxesImage

from kd_lightning.cli.sweep_report import main
from kd_lightning.reporting.calibration import ReliabilityBins, expected_calibration_error, reliability_figure
from kd_lightning.reporting.sweep_plots import plot_sweep
from kd_lightning.reporting.sweep_report import read_jobs, sweep_kind

METRIC = "val/acc_best"


def make_sweep(root: Path, jobs: list[tuple[dict[str, str], float | str | None]]) -> Path:
    """One Hydra job folder per entry: ``.hydra/overrides.yaml`` and a summary.json holding the value;
    None leaves the summary out (the job failed), ``"unreadable"`` writes a truncated one."""
    for number, (params, value) in enumerate(jobs):
        job = root / str(number)
        (job / ".hydra").mkdir(parents=True)
        lines = [f"- {key}={param}" for key, param in params.items()] + ["- logger=none"]
        (job / ".hydra" / "overrides.yaml").write_text("\n".join(lines) + "\n")
        if value == "unreadable":
            (job / "summary.json").write_text('{"metr')
        elif value is not None:
            summary = {"metrics": {METRIC: value}, "config": {"optimized_metric": METRIC}}
            (job / "summary.json").write_text(json.dumps(summary))
    return root


def grid_jobs(skip: tuple[str, str] | None = None) -> list[tuple[dict[str, str], float | str | None]]:
    """``-m loss.temperature=1,2,4 loss.alpha=0.1,0.5``: T=2, alpha=0.5 failed; ``skip`` never ran."""
    jobs = []
    for alpha in ("0.1", "0.5"):
        for temperature in ("1", "2", "4"):
            if (temperature, alpha) == skip:
                continue
            value = None if (temperature, alpha) == ("2", "0.5") else 0.5 + float(alpha) / 4 + float(temperature) / 40
            jobs.append(({"loss.temperature": temperature, "loss.alpha": alpha}, value))
    return jobs


def search_jobs(n: int = 16, seed: int = 0, lr: bool = False) -> list[tuple[dict[str, str], float | str | None]]:
    """An Optuna-like search: ``interval`` samples printed in full; trials 3 and 7 failed, 11 unreadable."""
    rng = random.Random(seed)
    jobs = []
    for trial in range(n):
        if lr:
            params = {"optimizer.lr": repr(10 ** rng.uniform(-4, -1)), "loss.alpha": repr(rng.uniform(0.1, 1.0))}
        else:
            params = {"loss.temperature": repr(rng.uniform(1.0, 8.0)), "loss.alpha": repr(rng.uniform(0.1, 1.0))}
        value = {3: None, 7: None, 11: "unreadable"}.get(trial, rng.uniform(0.6, 0.8))
        jobs.append((params, value))
    return jobs


def texts(ax) -> dict[tuple[float, float], str]:
    return {tuple(text.get_position()): text.get_text() for text in ax.texts}


def test_a_grid_sweep_is_a_heatmap_with_the_best_cell_marked(tmp_path: Path) -> None:
    varying, records, metric = read_jobs(make_sweep(tmp_path / "grid", grid_jobs()), None)
    assert varying == ["loss.alpha", "loss.temperature"] and metric == METRIC
    plot = plot_sweep(records, varying, metric)
    assert plot.kind == "grid" == sweep_kind(records, varying)
    ax = plot.figure.axes[0]
    assert any(isinstance(artist, AxesImage) for artist in ax.get_children())
    labels = texts(ax)
    assert len(labels) == 6 and list(labels.values()).count("failed") == 1
    assert labels[(1.0, 1.0)] == "failed"  # row alpha=0.5, column T=2
    (best,) = [text for text in ax.texts if "best" in text.get_text()]
    assert best.get_position() == (2, 1) and best.get_text() == "0.725\nbest"  # T=4, alpha=0.5
    assert best.get_fontweight() == "bold" and best.get_path_effects()
    assert labels[(0.0, 0.0)] == "0.550"  # the darkest cell of viridis: white text, the brightest: black
    colors = {text.get_text(): text.get_color() for text in ax.texts}
    assert colors["0.550"] == "white" and colors["0.725\nbest"] == "black"

    main([str(tmp_path / "grid")])
    assert (tmp_path / "grid" / "sweep_heatmap.png").stat().st_size > 1000


def test_a_combination_that_never_ran_is_blank_not_failed(tmp_path: Path) -> None:
    jobs = grid_jobs(skip=("4", "0.1"))
    jobs[0] = (jobs[0][0], "unreadable")  # T=1, alpha=0.1: ran, summary damaged
    varying, records, metric = read_jobs(make_sweep(tmp_path, jobs), None)
    assert [r["status"] for r in records].count("failed") == 1 and len(records) == 5
    plot = plot_sweep(records, varying, metric)
    assert plot.kind == "grid"
    labels = texts(plot.figure.axes[0])
    assert (2.0, 0.0) not in labels  # T=4, alpha=0.1 never ran: no label at all
    assert len(labels) == 5 and [labels[(0.0, 0.0)], labels[(1.0, 1.0)]] == ["failed", "failed"]
    assert "1 not run" in plot.figure.axes[0].get_title()


def test_an_optuna_search_is_trials_and_the_metric_per_trial(tmp_path: Path) -> None:
    jobs = search_jobs()
    varying, records, metric = read_jobs(make_sweep(tmp_path / "search", jobs), None)
    plot = plot_sweep(records, varying, metric)
    assert plot.kind == "search"
    trials_ax, per_trial, _colorbar = plot.figure.axes
    assert not any(isinstance(artist, AxesImage) for artist in trials_ax.get_children())
    assert (trials_ax.get_xlabel(), trials_ax.get_ylabel()) == ("loss.temperature", "loss.alpha")
    assert trials_ax.get_xscale() == "linear"  # 1..8 spans less than 2 decades

    collections = {c.get_label(): c for c in trials_ax.collections if isinstance(c, PathCollection)}
    assert len(collections["failed trial"].get_offsets()) == 3  # failed and unreadable alike
    coloured = collections["trial (colour: metric)"]
    assert len(coloured.get_offsets()) == 13 and coloured.get_array() is not None
    ok = [r for r in records if r["status"] == "ok"]
    best = max(ok, key=lambda r: r["value"])
    assert tuple(collections["_best"].get_offsets()[0]) == pytest.approx(
        (float(best["loss.temperature"]), float(best["loss.alpha"]))
    )

    lines = {line.get_label(): line for line in per_trial.get_lines()}
    running = lines["running best"].get_ydata()
    assert list(running) == sorted(running) and running[-1] == pytest.approx(best["value"])
    assert list(lines["failed trial"].get_xdata()) == [3, 7, 11]
    legend_labels = [t.get_text() for t in plot.figure.legends[0].get_texts()]
    assert f"best: {best['value']:.3f} (trial {best['job']})" in legend_labels

    plot.figure.canvas.draw()
    for ax in plot.figure.axes:
        for axis in (ax.xaxis, ax.yaxis):
            for label in axis.get_ticklabels() + axis.get_ticklabels(minor=True):
                assert len(label.get_text()) <= 8, (ax.get_label(), label.get_text())

    main([str(tmp_path / "search")])
    assert (tmp_path / "search" / "sweep_trials.png").stat().st_size > 1000
    assert not (tmp_path / "search" / "sweep_heatmap.png").exists()


def test_a_search_over_decades_gets_a_log_axis_with_short_labels(tmp_path: Path) -> None:
    varying, records, metric = read_jobs(make_sweep(tmp_path, search_jobs(24, seed=1, lr=True)), None)
    plot = plot_sweep(records, varying, metric)
    trials_ax = plot.figure.axes[0]
    assert (trials_ax.get_xlabel(), trials_ax.get_xscale(), trials_ax.get_yscale()) == ("optimizer.lr", "log", "linear")
    plot.figure.canvas.draw()
    labels = [t.get_text() for ax in plot.figure.axes for t in ax.get_xticklabels() + ax.get_yticklabels()]
    assert labels and all(len(text) <= 8 for text in labels), labels


@pytest.mark.parametrize(
    ("jobs", "kind"),
    [
        (grid_jobs(), "grid"),
        (grid_jobs(skip=("4", "0.1")), "grid"),  # an interrupted grid: its typed values still form a grid
        (search_jobs(2), "search"),  # 2 trials: 2 jobs for 2 x 2 cells
        (search_jobs(4), "search"),
        ([({"loss.temperature": t, "loss.alpha": a}, 0.7) for t, a in [("1", "0.1"), ("2", "0.5")] * 3], "search"),
        ([({"loss.temperature": t}, 0.7) for t in ("1", "2", "4")], None),  # one parameter, a grid: no plot
        ([({"loss.temperature": repr(1 + t / 7)}, 0.7) for t in range(5)], "search"),
    ],
    ids=["grid", "interrupted-grid", "2-trials", "4-trials", "repeated-choices", "1-param-grid", "1-param-search"],
)
def test_grids_and_searches_are_told_apart(tmp_path: Path, jobs: list, kind: str | None) -> None:
    varying, records, metric = read_jobs(make_sweep(tmp_path, jobs), None)
    assert sweep_kind(records, varying) == kind
    plot = plot_sweep(records, varying, metric)
    assert (plot and plot.kind) == kind


def test_the_reliability_diagram_counts_the_samples_per_bin_and_its_legend_covers_nothing() -> None:
    torch.manual_seed(0)
    targets = torch.randint(0, 10, (500,))
    logits = {"teacher": 3 * torch.randn(500, 10), "student": torch.randn(500, 10)}
    logits["teacher"][torch.arange(500), targets] += 4
    bins = {name: ReliabilityBins.of(out, targets) for name, out in logits.items()}
    figure = reliability_figure(bins, {name: expected_calibration_error(out, targets) for name, out in logits.items()})
    counts = [ax for ax in figure.axes if ax.get_ylabel() == "samples"]
    diagrams = [ax for ax in figure.axes if ax.get_ylabel() == "accuracy"]
    assert len(counts) == len(diagrams) == 2
    for ax, model in zip(counts, bins.values(), strict=True):
        heights = [patch.get_height() for patch in ax.patches]
        assert len(heights) == 15 and sum(heights) == 500
        assert heights == model.count.tolist()

    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    (legend,) = figure.legends
    box = legend.get_window_extent(renderer)
    for ax in figure.axes:
        assert not box.overlaps(ax.get_window_extent(renderer))  # outside every panel
    for ax in diagrams:
        for artist in [*ax.patches, *ax.lines]:
            assert not box.overlaps(artist.get_window_extent(renderer))
    assert box.y0 >= 0 and box.x0 >= 0 and box.x1 <= figure.bbox.width  # and not clipped by the figure


def test_a_lower_is_better_metric_picks_the_lowest_job_and_a_typo_is_one_error(tmp_path: Path) -> None:
    from kd_lightning.engine.metrics import direction
    from kd_lightning.reporting.sweep_report import write_table

    root = make_sweep(tmp_path / "sweep", [({"loss.alpha": "0.1"}, 0.2), ({"loss.alpha": "0.5"}, 0.9)])
    for job, value in zip(sorted(root.iterdir()), (0.2, 0.9), strict=True):  # the same values as val/loss
        summary = json.loads((job / "summary.json").read_text())
        summary["metrics"]["val/loss"] = value
        (job / "summary.json").write_text(json.dumps(summary))
    varying, records, metric = read_jobs(root, "val/loss")
    table = write_table(records, varying, metric, tmp_path).read_text()
    assert "Best val/loss: 0.2000 (job 0: loss.alpha=0.1)" in table
    varying, records, metric = read_jobs(root, METRIC)
    assert (
        "Best val/acc_best: 0.9000 (job 1: loss.alpha=0.5)"
        in write_table(records, varying, metric, tmp_path).read_text()
    )
    assert [direction(m) for m in ("val/loss", "val/kl_to_teacher", "val/ppl", "test/ece", "val/acc_best")] == [
        "minimize", "minimize", "minimize", "minimize", "maximize",
    ]  # fmt: skip
    with pytest.raises(SystemExit, match="--metric val/nope is in no job's summary"):
        read_jobs(root, "val/nope")


def seeded_grid_jobs() -> list[tuple[dict[str, str], float | str | None]]:
    """``-m loss.temperature=1,4 loss.alpha=0.1,0.9 seed=0,1``: the seeds differ by ±0.01 (T=4, alpha=0.9 by
    ±0.02); seed 1 of T=1, alpha=0.1 failed."""
    jobs = []
    for alpha in ("0.1", "0.9"):
        for temperature in ("1", "4"):
            mean = 0.70 + float(alpha) / 100 + float(temperature) / 200
            noise = 0.02 if (temperature, alpha) == ("4", "0.9") else 0.01
            for seed, sign in (("0", -1), ("1", 1)):
                failed = (temperature, alpha, seed) == ("1", "0.1", "1")
                value = None if failed else mean + sign * noise
                jobs.append(({"loss.temperature": temperature, "loss.alpha": alpha, "seed": seed}, value))
    return jobs


def test_a_sweep_over_seeds_is_a_heatmap_of_mean_and_std_on_a_noise_wide_scale(tmp_path: Path) -> None:
    """Each cell is one setting's mean ± std over its seeds; the colour scale spans at least 4 pooled seed
    standard deviations (cells within noise look alike) and its legend says so; the table adds the setting rows."""
    import math

    from kd_lightning.reporting.sweep_report import by_setting, pooled_std

    varying, records, metric = read_jobs(make_sweep(tmp_path / "seeds", seeded_grid_jobs()), None)
    assert varying == ["loss.alpha", "loss.temperature", "seed"]
    settings, merged = by_setting(records, varying)
    assert settings == ["loss.alpha", "loss.temperature"] and len(merged) == 4
    first = merged[0]  # alpha 0.1, T 1: one seed of two gave a value
    assert (first["seeds"], first["failed"], first["std"]) == (1, 1, None)
    assert first["value"] == pytest.approx(0.70 + 0.001 + 0.005 - 0.01)
    widest = next(r for r in merged if (r["loss.alpha"], r["loss.temperature"]) == ("0.9", "4"))
    assert widest["std"] == pytest.approx(0.02 * math.sqrt(2))  # two seeds at mean ± 0.02
    noise = pooled_std(merged)  # three settings with 2 seeds, one degree of freedom each
    assert noise == pytest.approx(math.sqrt((2 * (0.01 * math.sqrt(2)) ** 2 + (0.02 * math.sqrt(2)) ** 2) / 3))

    plot = plot_sweep(records, varying, metric)
    assert plot.kind == "grid"
    ax, colorbar_ax = plot.figure.axes
    labels = texts(ax)
    assert labels[(1.0, 1.0)] == f"{0.70 + 0.009 + 0.02:.3f}\n± {0.02 * math.sqrt(2):.3f}\nn=2\nbest"
    assert labels[(0.0, 0.0)] == f"{0.70 + 0.001 + 0.005 - 0.01:.3f}\nn=1, 1 failed"  # one seed: no ± shown
    assert labels[(1.0, 0.0)] == f"{0.70 + 0.001 + 0.02:.3f}\n± {0.01 * math.sqrt(2):.3f}\nn=2"
    assert "mean ± std over 2 seeds" in ax.get_title()
    low, high = ax.images[0].get_clim()
    cells = [r["value"] for r in merged]
    assert high - low == pytest.approx(max(max(cells) - min(cells), 4 * noise))
    assert (low + high) / 2 == pytest.approx((max(cells) + min(cells)) / 2)
    assert f"±{2 * noise:.3g}" in colorbar_ax.get_ylabel()

    main([str(tmp_path / "seeds")])
    table = (tmp_path / "seeds" / "sweep_summary.md").read_text()
    assert "| 0.9 | 4 | " + f"{widest['value']:.4f} ± {widest['std']:.4f} | 2 |" in table
    assert "| 0.1 | 1 | " + f"{first['value']:.4f} | 1 (1 failed) |" in table
    assert "Best mean val/acc_best: " in table


def test_a_one_seed_heatmap_says_so_and_a_small_accuracy_spread_is_not_stretched(tmp_path: Path) -> None:
    jobs = [
        ({"loss.temperature": t, "loss.alpha": a}, 0.80 + 0.001 * i)
        for i, (t, a) in enumerate((t, a) for a in ("0.1", "0.9") for t in ("1", "4"))
    ]
    varying, records, metric = read_jobs(make_sweep(tmp_path, jobs), None)
    ax, colorbar_ax = plot_sweep(records, varying, metric).figure.axes
    assert "(1 seed)" in ax.get_title() and "1 seed: scale ≥ 0.05 wide" in colorbar_ax.get_ylabel()
    low, high = ax.images[0].get_clim()
    assert high - low == pytest.approx(0.05)  # a 0.003 spread is not drawn from darkest to brightest
