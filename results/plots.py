"""The report's plots: PNG files drawn headless with matplotlib's Agg canvas (no pyplot, no global state).

Each function takes plain data, writes one file and returns a :class:`PlotFile` that counts what was drawn,
so callers and tests can check a plot without reading pixels.
"""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure

_SIZE = (7.0, 4.2)
_DPI = 110
_MAX_LEGEND = 12


@dataclass(frozen=True)
class PlotFile:
    """A written plot: where it is and how many lines and bars it holds."""

    path: Path
    lines: int
    bars: int


@dataclass(frozen=True)
class Curve:
    """One trial's metric per epoch; ``cut`` marks a trial ASHA stopped early."""

    label: str
    epochs: Sequence[int]
    values: Sequence[float]
    cut: bool = False


@dataclass(frozen=True)
class Group:
    """The trials that share one value (or one range of values) of a searched knob."""

    label: str
    values: Sequence[float]

    def best(self, mode: str) -> float:
        """The best of the group's trials (the highest for ``max``, the lowest for ``min``)."""
        return max(self.values) if mode == "max" else min(self.values)

    @property
    def mean(self) -> float:
        """The mean over the group's trials."""
        return statistics.fmean(self.values)


def plot_curves(path: Path, curves: Sequence[Curve], *, metric: str, max_epochs: int) -> PlotFile:
    """The metric per epoch, one line per trial; an ``x`` where ASHA stopped a trial."""
    figure, ax = _figure(f"{metric} per epoch", xlabel="epoch", ylabel=metric)
    for curve in curves:
        (line,) = ax.plot(curve.epochs, curve.values, marker="o", markersize=3, label=curve.label)
        if curve.cut and curve.epochs:
            ax.scatter([curve.epochs[-1]], [curve.values[-1]], marker="x", s=60, color=line.get_color(),
                       zorder=3)
    ax.set_xlim(0.5, max_epochs + 0.5)
    ax.set_xticks(range(1, max_epochs + 1))
    if any(curve.cut for curve in curves):
        ax.set_title(f"{metric} per epoch (x: stopped early)")
    if 0 < len(curves) <= _MAX_LEGEND:
        ax.legend(fontsize="small", ncol=2)
    return _save(figure, ax, path)


def plot_best_so_far(path: Path, minutes: Sequence[float], values: Sequence[float], *, metric: str,
                     mode: str) -> PlotFile:
    """Every epoch result (dots) and the search's best result so far (a step line) against wall time."""
    figure, ax = _figure(f"best {metric} so far", xlabel="minutes since the search started", ylabel=metric)
    ax.scatter(minutes, values, s=12, alpha=0.5, label="epoch results")
    ax.step(minutes, list(itertools.accumulate(values, max if mode == "max" else min)), where="post",
            label="best so far")
    ax.legend(fontsize="small")
    return _save(figure, ax, path)


def plot_knob(path: Path, knob: str, groups: Sequence[Group], *, metric: str, mode: str) -> PlotFile:
    """One bar per knob value: the best trial's metric; the dots are every trial's."""
    figure, ax = _figure(f"{metric} by {knob}", xlabel=knob, ylabel=f"{metric} (bar: best, dots: trials)")
    positions = range(len(groups))
    ax.bar(positions, [group.best(mode) for group in groups], width=0.6, alpha=0.7)
    for position, group in zip(positions, groups, strict=True):
        ax.scatter([position] * len(group.values), group.values, color="black", s=14, zorder=3)
    ax.set_xticks(list(positions), [group.label for group in groups])
    return _save(figure, ax, path)


def plot_importances(path: Path, shares: Mapping[str, float], *, metric: str, trials: int) -> PlotFile:
    """One bar per searched knob: its share of the metric's variance (fANOVA)."""
    figure, ax = _figure(f"which knobs mattered for {metric} ({trials} trials)", xlabel="knob",
                         ylabel="share of the variance (fANOVA)")
    positions = range(len(shares))
    ax.bar(positions, list(shares.values()), width=0.6, alpha=0.7)
    ax.set_xticks(list(positions), list(shares))
    return _save(figure, ax, path)


def plot_class_counts(path: Path, classes: Sequence[str], counts: Mapping[str, Sequence[int]]) -> PlotFile:
    """Objects per class, one bar per class and split (``counts``: split -> one count per class, in order)."""
    figure, ax = _figure("objects per class", xlabel="class", ylabel="objects")
    width = 0.8 / max(len(counts), 1)
    for index, (split, values) in enumerate(counts.items()):
        ax.bar([c + index * width for c in range(len(classes))], values, width=width, label=split)
    ax.set_xticks([c + 0.4 - width / 2 for c in range(len(classes))], list(classes), rotation=30, ha="right")
    ax.legend(fontsize="small")
    return _save(figure, ax, path)


@dataclass(frozen=True)
class Axis:
    """One objective on a Pareto plot: its label, each trial's value, and the limits to draw on it."""

    label: str
    values: Sequence[float]
    limits: Sequence[float] = ()


def plot_pareto(path: Path, x: Axis, y: Axis, *, front: Sequence[int], labels: Sequence[str]) -> PlotFile:
    """Every trial a point, the Pareto front's points marked and joined, the limits as dashed lines.

    Args:
        path: The PNG to write.
        x: The other objective, one value per trial.
        y: The primary metric, one value per trial.
        front: Indices of the front's trials.
        labels: Each trial's name, written beside the front's points.
    """
    figure, ax = _figure(f"{y.label} against {x.label}", xlabel=x.label, ylabel=y.label)
    ax.scatter(x.values, y.values, s=18, alpha=0.6, label="trials")
    ordered = sorted(front, key=lambda i: (x.values[i], y.values[i]))
    ax.plot([x.values[i] for i in ordered], [y.values[i] for i in ordered], marker="*", markersize=11,
            color="tab:red", label="Pareto front")
    for i in ordered:
        ax.annotate(labels[i], (x.values[i], y.values[i]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    for limit in x.limits:
        ax.axvline(limit, linestyle="--", color="gray")
    for limit in y.limits:
        ax.axhline(limit, linestyle="--", color="gray")
    ax.legend(fontsize="small")
    return _save(figure, ax, path)


def _figure(title: str, *, xlabel: str, ylabel: str) -> tuple[Figure, Axes]:
    figure = Figure(figsize=_SIZE, dpi=_DPI, layout="constrained")
    ax = figure.add_subplot()
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return figure, ax


def _save(figure: Figure, ax: Axes, path: Path) -> PlotFile:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return PlotFile(path=path, lines=len(ax.get_lines()), bars=len(ax.patches))
