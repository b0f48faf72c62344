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

from collections.abc import Mapping

from spaces.schema import Space

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
