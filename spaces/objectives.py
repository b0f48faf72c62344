"""Several objectives and hard limits: which trials are feasible, and which form the Pareto front.

Pure logic over plain numbers, shared by the searcher (what Optuna is told), the driver (the best feasible
trial, the front's MLflow tags) and the result commands (report, export).

A trial's value of a metric is the one its exported checkpoint has: a val score at the trial's best epoch by
the primary metric, a cost (``inference/``, ``model/``) as last measured, since it belongs to the architecture
and input scale, not to the epoch.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Protocol, TypeVar

FPS_METRIC = "inference/fps"
GFLOPS_METRIC = "model/gflops"
PARAMS_METRIC = "model/params_M"
COST_METRICS = (FPS_METRIC, GFLOPS_METRIC, PARAMS_METRIC)
"""What running a trial's model costs; every trial reports them, stopped early or not."""
COST_MODES = {FPS_METRIC: "max", GFLOPS_METRIC: "min", PARAMS_METRIC: "min"}
"""Which way each cost is better: more frames per second, fewer GFLOPs and parameters."""

SCORE_PREFIX = "val/"
UNMEASURED = 1e6
"""The violation of a limit on a metric the trial never reported: larger than any real one, and finite, since
Optuna adds violations up."""

Key = TypeVar("Key", bound=Hashable)


class Bounds(Protocol):
    """A hard limit on one metric: ``min`` and/or ``max``, inclusive."""

    @property
    def min(self) -> float | None: ...

    @property
    def max(self) -> float | None: ...


def fold_row(values: Mapping[str, float], row: Mapping[str, float], *, primary: str, mode: str) -> dict[str, float]:
    """Adds one epoch's row to a trial's values (see the module docstring for which value counts).

    Args:
        values: The trial's values so far (empty before its first epoch).
        row: The next epoch's metrics.
        primary: The search's metric; its first best epoch decides the val scores.
        mode: ``max`` or ``min`` for ``primary``.
    """
    out = dict(values)
    out.update({k: v for k, v in row.items() if not k.startswith(SCORE_PREFIX)})
    new, old = row.get(primary), values.get(primary)
    if new is not None and (old is None or (new > old if mode == "max" else new < old)):
        out = {k: v for k, v in out.items() if not k.startswith(SCORE_PREFIX)}
        out.update({k: v for k, v in row.items() if k.startswith(SCORE_PREFIX)})
    return out


def trial_values(rows: Iterable[Mapping[str, float]], *, primary: str, mode: str) -> dict[str, float]:
    """A trial's values from its epoch rows, in epoch order."""
    values: dict[str, float] = {}
    for row in rows:
        values = fold_row(values, row, primary=primary, mode=mode)
    return values


def limit_violations(values: Mapping[str, float], constraints: Mapping[str, Bounds]) -> dict[str, float]:
    """One number per limit (``inference/fps >=``, ...), Optuna's convention: <= 0 where it is met, else how far
    off, relative to the limit.

    Relative, so that limits in different units (fps, millions of parameters) add up fairly when the closest
    infeasible trials are ranked. A metric the trial never reported breaks its limit by :data:`UNMEASURED`.
    """
    out = {}
    for metric, bounds in constraints.items():
        value = values.get(metric)
        for limit, sign, name in ((bounds.min, 1.0, ">="), (bounds.max, -1.0, "<=")):
            if limit is None:
                continue
            if value is None or not math.isfinite(value):
                out[f"{metric} {name}"] = UNMEASURED
            else:
                out[f"{metric} {name}"] = sign * (limit - value) / (abs(limit) or 1.0)
    return out


def violations(values: Mapping[str, float], constraints: Mapping[str, Bounds]) -> list[float]:
    """The numbers of :func:`limit_violations`, in the limits' order."""
    return list(limit_violations(values, constraints).values())


def is_feasible(values: Mapping[str, float], constraints: Mapping[str, Bounds]) -> bool:
    """Whether the values meet every limit."""
    return all(v <= 0 for v in violations(values, constraints))


def shortfall(values: Mapping[str, float], constraints: Mapping[str, Bounds]) -> float:
    """How far the values are from meeting every limit, in relative units (0 when feasible)."""
    return sum(max(v, 0.0) for v in violations(values, constraints))


def dominates(a: Sequence[float], b: Sequence[float], modes: Sequence[str]) -> bool:
    """Whether ``a`` is at least as good as ``b`` in every objective and better in one."""
    better = [x > y if m == "max" else x < y for x, y, m in zip(a, b, modes, strict=True)]
    worse = [x < y if m == "max" else x > y for x, y, m in zip(a, b, modes, strict=True)]
    return any(better) and not any(worse)


def pareto_front(points: Mapping[Key, Sequence[float]], modes: Sequence[str]) -> list[Key]:
    """The keys of the points no other point dominates, in the mapping's order.

    Args:
        points: One vector of objective values per key (e.g. per trial).
        modes: ``max`` or ``min`` per objective, in the vectors' order.
    """
    return [key for key, point in points.items()
            if not any(dominates(other, point, modes) for other in points.values())]


def best_trial(values: Mapping[Key, Mapping[str, float]], *, metric: str, mode: str,
               constraints: Mapping[str, Bounds]) -> Key | None:
    """The key of the best ``metric`` among the trials that meet every limit (the first on a tie), or None."""
    feasible = [(key, v[metric]) for key, v in values.items() if metric in v and is_feasible(v, constraints)]
    if not feasible:
        return None
    pick = max if mode == "max" else min
    return pick(feasible, key=lambda item: item[1])[0]


def feasible_front(values: Mapping[Key, Mapping[str, float]], *, directions: Sequence[tuple[str, str]],
                   constraints: Mapping[str, Bounds]) -> list[Key]:
    """The Pareto front of the trials that meet every limit and have a value for every objective.

    Args:
        values: Each trial's values (:func:`trial_values`).
        directions: (metric, mode) per objective.
        constraints: The limits; a trial outside one can't be chosen, so it is not on the front.
    """
    metrics = [metric for metric, _ in directions]
    points = {key: [v[m] for m in metrics] for key, v in values.items()
              if all(m in v for m in metrics) and is_feasible(v, constraints)}
    return pareto_front(points, [mode for _, mode in directions])
