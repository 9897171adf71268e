"""What every NerVE figure shares: metric axis labels, a pyplot-free figure, panel grids and tick positions.

The figures themselves: :mod:`nerve_hf.analysis.probe_plots` (one measurement) and
:mod:`nerve_hf.analysis.run_plots` (a run over training, several runs compared).
"""

from __future__ import annotations

import math

from nerve_hf.errors import requires
from nerve_hf.metrics import METRIC_NAMES

__all__ = ["METRIC_LABELS", "new_figure", "integer_axis", "panel_grid", "even_ticks", "grid"]


def _label(name: str) -> str:
    """``se_pre`` -> ``SE pre``; ``js`` (no side: it compares the two) -> ``JS(pre, post)``."""
    metric, _, side = name.partition("_")
    return f"{metric.upper()} {side}" if side else f"{metric.upper()}(pre, post)"


METRIC_LABELS = {name: _label(name) for name in METRIC_NAMES}  # metric column -> axis label


def new_figure(width: float, height: float):
    """A ``width`` x ``height`` inch figure with the constrained layout, built without pyplot."""
    with requires("analysis"):
        from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def integer_axis(ax) -> None:
    """Integer ticks only on the x axis of ``ax`` (layers, steps)."""
    with requires("analysis"):
        from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def panel_grid(n: int, columns: int = 4, size: tuple[float, float] = (3.6, 2.9)):
    """A figure of ``n`` panels of ``size`` inches, ``columns`` to a row: (figure, its axes as one flat array
    [rows * columns], those after the first ``n`` hidden)."""
    rows = math.ceil(n / columns)
    figure = new_figure(size[0] * columns, size[1] * rows)
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return figure, axes


def even_ticks(n: int, most: int = 6) -> list[float]:
    """At most ``most`` evenly spread positions among ``n`` (all of them when ``n <= most``)."""
    if n <= most:
        return list(range(n))
    return [i * (n - 1) / (most - 1) for i in range(most)]


def grid(ax) -> None:
    """The one grid style of every NerVE panel: major ticks only, light (log axes get no minor grid)."""
    ax.grid(alpha=0.3, which="major")
