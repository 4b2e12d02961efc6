"""What the sweep plots share (:mod:`kd_lightning.reporting.sweep_plots`, ``sweep_heatmap``): figures outside
pyplot, short tick labels, text that contrasts with its cell, the best record, the colours."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kd_lightning.engine.metrics import best as best_record
from kd_lightning.reporting.sweep_report import metric_value, number

if TYPE_CHECKING:
    from matplotlib.axis import Axis
    from matplotlib.figure import Figure

#: Up to this many characters a parameter value is its own tick label; longer numbers get 3 digits.
SHORT_LABEL = 8
#: The colour that marks the best cell / trial.
BEST_COLOR = "#d62728"
FAILED_COLOR = "0.55"
#: Behind "failed" on a hatched cell, so the hatching does not cross the word.
LABEL_BOX = {"facecolor": "0.92", "edgecolor": "none", "pad": 1.5}


def short(text: str) -> str:
    """A tick label of at most ``SHORT_LABEL`` characters: the value as typed, else 3 significant digits."""
    if len(text) <= SHORT_LABEL:
        return text
    value = number(text)
    return f"{value:.3g}" if value is not None else text[: SHORT_LABEL - 1] + "…"


def new_figure(**kwargs: Any) -> Figure:
    """A figure outside pyplot (no global state to close), drawn by Agg, laid out by constrained layout."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(layout="constrained", **kwargs)
    FigureCanvasAgg(figure)
    return figure


def short_ticks(axis: Axis) -> None:
    """Numeric tick labels with the fewest significant digits (3 to 6) that show the ticks exactly (else that
    keep them apart); no offset text, no 16-digit floats."""
    from matplotlib.ticker import Formatter

    class Short(Formatter):
        ticks: tuple[float, ...] = ()

        def set_locs(self, locs: list[float]) -> None:
            self.ticks = tuple(locs)

        def __call__(self, x: float, pos: int | None = None) -> str:
            ticks = self.ticks or (x,)
            scale = max(abs(v) for v in ticks) or 1.0

            def clean(v: float) -> float:
                return 0.0 if abs(v) < 1e-9 * scale else v

            def exact(d: int) -> bool:
                return all(abs(float(f"{clean(v):.{d}g}") - clean(v)) <= 1e-9 * scale for v in ticks)

            def apart(d: int) -> bool:
                return len({f"{clean(v):.{d}g}" for v in ticks}) == len(set(ticks))

            digits = next((d for d in range(3, 7) if exact(d)), None) or next((d for d in range(3, 7) if apart(d)), 6)
            return f"{clean(x):.{digits}g}"

    axis.set_major_formatter(Short())


def contrast(rgba: tuple[float, ...]) -> str:
    """Black or white, whichever contrasts more with ``rgba`` (WCAG relative luminance)."""

    def linear(c: float) -> float:
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    red, green, blue = (linear(c) for c in rgba[:3])
    luminance = 0.2126 * red + 0.7152 * green + 0.0722 * blue
    return "black" if luminance > 0.179 else "white"


def best_of(records: list[dict[str, Any]], metric: str) -> dict[str, Any] | None:
    """The record with the best metric (lowest for a loss, KL, perplexity, ECE; the first of ties, as in the table)."""
    return best_record(records, metric, metric_value)


def format_value(value: float) -> str:
    return f"{value:.3f}" if abs(value) < 100 else f"{value:.4g}"
