"""Metric names: mmengine/mmdet keys in, the experiment log's column names out."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from spaces.objectives import COST_MODES

VAL_PREFIX = "val/"
TRAIN_PREFIX = "train/"
EPOCH = "epoch"


def val_metrics(evaluated: Mapping[str, float]) -> dict[str, float]:
    """Renames evaluator output (``coco/bbox_mAP``) to the log's names (``val/bbox_mAP``).

    mmengine's LogProcessor strips ``val/``, so this is the one place the prefix comes back. COCO writes -1
    when an area range holds no objects: that is not a score, so the key is left out (missing).
    Non-numeric entries (e.g. mmdet's ``*_copypaste`` strings) are dropped.
    """
    out: dict[str, float] = {}
    for key, value in evaluated.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value == -1:
            continue
        out[VAL_PREFIX + key.split("/", 1)[-1]] = float(value)
    return out


def no_detection_scores(area_ranges: Iterable[str]) -> dict[str, float]:
    """The val columns of a model that detects nothing: AP 0 wherever ground truth exists.

    mmdet's CocoMetric returns no numbers at all when a whole val set yields no boxes (common in a
    from-scratch model's first epoch); that is a real score of zero, not a missing one.
    """
    suffixes = ["", "_50", "_75", *(f"_{r}" for r in sorted(area_ranges))]
    return {f"{VAL_PREFIX}bbox_mAP{s}": 0.0 for s in suffixes}


def train_metrics(sums: Mapping[str, float], count: int) -> dict[str, float]:
    """Epoch means of the loss/acc values the model logged, under ``train/`` + mmdet's key."""
    if count == 0:
        return {}
    return {TRAIN_PREFIX + key: value / count for key, value in sums.items()}


def non_finite(metrics: Mapping[str, float]) -> list[str]:
    """Names of the metrics whose value is NaN or infinite."""
    return sorted(k for k, v in metrics.items() if not math.isfinite(v))


def known_mode(column: str) -> str | None:
    """Which way a column of the experiment log is better, where its kind says: val scores, train accuracies
    and FPS higher, train losses, GFLOPs and parameters lower; None for the rest (the learning rate)."""
    if column in COST_MODES:
        return COST_MODES[column]
    if column.startswith(VAL_PREFIX):
        return "max"
    name = column.removeprefix(TRAIN_PREFIX).rsplit(".", 1)[-1]  # cascade stages: train/s0.loss_cls
    if column.startswith(TRAIN_PREFIX) and name.startswith("loss"):
        return "min"
    if column.startswith(TRAIN_PREFIX) and name.startswith("acc"):
        return "max"
    return None
