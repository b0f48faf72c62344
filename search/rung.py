"""What ASHA compares at a rung: the search's metric, its ties broken.

Ray's ``AsyncHyperBandScheduler`` stops a trial only when its value is strictly below the rung's cutoff (a
percentile of the values recorded there before it), so every trial tied at the cutoff goes on. Early-epoch mAPs
tie often (a from-scratch model detects next to nothing after one epoch), so ASHA ranks trials by
``search/rung_score`` instead: the metric, then the other IoU form of the mAP (``val/bbox_mAP_50``, or
``val/bbox_mAP`` when that is the metric), then the lower ``train/loss``. The secondaries are scaled under the
metric's resolution, so the score reads as the metric and orders like the triple: mAPs closer than 1e-6 (0.0001 AP)
are decided by the second key, second keys closer than 1e-4 (0.01 AP) by the loss. The loss is continuous, so a
tie on all three is rare: at an early rung's mAPs (~0.001) a double still tells losses 1e-7 apart, at a mAP of 0.5
losses 1e-4 apart. Everything else (the searcher, checkpoints, report, export) keeps the metric itself.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
from ray.tune.schedulers import FIFOScheduler

from spaces.schema import Space

if TYPE_CHECKING:
    from ray.tune.execution.tune_controller import TuneController
    from ray.tune.experiment import Trial

RUNG_SCORE = "search/rung_score"
LOOSER_MAP = "val/bbox_mAP_50"
STRICT_MAP = "val/bbox_mAP"
TRAIN_LOSS = "train/loss"
SECOND_WEIGHT = 1e-6
THIRD_WEIGHT = 1e-10


def second_key(metric: str) -> str:
    """The tie-breaker after ``metric``: the mAP at IoU 0.5, or the strict mAP when the metric is the former."""
    return STRICT_MAP if metric == LOOSER_MAP else LOOSER_MAP


def rung_score(row: Mapping[str, float], *, metric: str, mode: str) -> float:
    """``metric`` + 1e-6 x the second key + 1e-10 x 1/(1 + train loss), each term pointing the way of ``mode``.

    Both secondaries lie in [0, 1] (a mAP; a loss is never negative), so neither outweighs a step of the term before
    it by more than its weight. A row without a secondary counts it as the worst value, 0.
    """
    sign = 1.0 if mode == "max" else -1.0
    loss = row.get(TRAIN_LOSS)
    breakers = SECOND_WEIGHT * row.get(second_key(metric), 0.0)
    breakers += THIRD_WEIGHT * (1.0 / (1.0 + loss) if loss is not None else 0.0)
    return row[metric] + sign * breakers


def with_rung_score(row: Mapping[str, float], space: Space) -> dict[str, float]:
    """``row`` and, when ASHA decides the search's rungs, its :data:`RUNG_SCORE`."""
    if space.scheduler.type != "asha":
        return dict(row)
    return {**row, RUNG_SCORE: rung_score(row, metric=space.metric, mode=space.mode)}


def below_cutoff(value: float, others: list[float], factor: int) -> bool:
    """Ray's ASHA rule: ``value`` is strictly below the ``1 - 1/factor`` quantile of the ``others`` (none: go on)."""
    return bool(others) and value < float(np.nanpercentile(others, (1 - 1 / factor) * 100))


class RecheckedASHA(FIFOScheduler):
    """Asynchronous successive halving that takes back a promotion made on a partly filled rung.

    Ray's ``AsyncHyperBandScheduler`` judges a trial once, when it reaches a rung, against the scores recorded there
    before it, so the first trials to arrive go on against few or none. This scheduler applies the same rule at
    arrival, and after every later epoch judges the trial again at each rung it passed, against every score recorded
    there since: a trial promoted early stops as soon as the rung's later arrivals leave it below the cutoff. It
    never pauses a trial, so the concurrency limit, checkpoints and a driver's resume work as with Ray's scheduler.
    """

    def __init__(self, *, time_attr: str, metric: str, mode: str, max_t: int, grace_period: int,
                 reduction_factor: int) -> None:
        super().__init__()
        self._metric = metric
        self._sign = 1.0 if mode == "max" else -1.0
        self._time_attr, self._max_t, self._factor = time_attr, max_t, reduction_factor
        milestones = itertools.takewhile(lambda t: t < max_t, (grace_period * reduction_factor ** k
                                                               for k in itertools.count()))
        self._rungs: dict[int, dict[str, float]] = {milestone: {} for milestone in milestones}

    def on_trial_result(self, tune_controller: TuneController, trial: Trial, result: dict[str, Any]) -> str:
        if self._time_attr not in result or self._metric not in result:
            return self.CONTINUE
        t = result[self._time_attr]
        if t >= self._max_t:
            return self.STOP
        return self.STOP if self._record(trial.trial_id, t, self._sign * result[self._metric]) else self.CONTINUE

    def _record(self, trial_id: str, t: float, score: float) -> bool:
        """Records ``score`` at the rung ``t`` reaches first; whether the trial is below the cutoff there, or now
        below it at a rung it passed before."""
        arrived = next((milestone for milestone, scores in self._rungs.items()
                        if t >= milestone and trial_id not in scores), None)
        below = False
        if arrived is not None:
            scores = self._rungs[arrived]
            below = below_cutoff(score, list(scores.values()), self._factor)
            scores[trial_id] = score
        return below or any(
            below_cutoff(scores[trial_id], [s for other, s in scores.items() if other != trial_id], self._factor)
            for milestone, scores in self._rungs.items() if milestone < t and trial_id in scores)

    def debug_string(self) -> str:
        return "Using ASHA with rechecked promotions: " + ", ".join(
            f"epoch {milestone}: {len(scores)} recorded" for milestone, scores in self._rungs.items())
