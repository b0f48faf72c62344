"""mmdet's COCO metric, its mAPs unrounded.

mmdet's ``CocoMetric`` rounds every mAP to 3 decimals (steps of 0.1 AP): early-epoch scores then collapse onto a
few values and ASHA's rungs are decided on ties. :class:`FullPrecisionCocoMetric` keeps everything mmdet computes and
logs, and replaces each rounded mAP with the same entry of the ``COCOeval.stats`` that mmdet ran. mmdet builds that
``COCOeval`` inside ``compute_metrics`` and never exposes it, so the class it instantiates is swapped, for the call
alone, for one that remembers its instances: evaluating a second time would double the evaluation's cost.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from mmdet.evaluation.metrics import coco_metric
from mmdet.registry import METRICS

from mmconfigs.tree import as_list

COCO_METRIC = "CocoMetric"
FULL_PRECISION_COCO_METRIC = "FullPrecisionCocoMetric"
STATS_INDEX = {"mAP": 0, "mAP_50": 1, "mAP_75": 2, "mAP_s": 3, "mAP_m": 4, "mAP_l": 5}
"""mmdet's metric items and where ``COCOeval.summarize`` puts each one in ``stats``."""
_EVALUATORS = ("COCOeval", "COCOevalMP")  # the classes coco_metric instantiates (use_mp_eval picks one)


@METRICS.register_module(name=FULL_PRECISION_COCO_METRIC)
class FullPrecisionCocoMetric(coco_metric.CocoMetric):  # type: ignore[misc]
    """``CocoMetric`` whose ``bbox_mAP``, ``bbox_mAP_50``, ... (and ``segm_*``) hold ``COCOeval.stats`` unrounded."""

    def compute_metrics(self, results: list[Any]) -> dict[str, float]:
        evaluations: list[Any] = []
        with _remembering_evaluations(evaluations):
            metrics: dict[str, float] = super().compute_metrics(results)
        for evaluation in evaluations:
            if not evaluation.params.useCats:  # 'proposal': recall of class-agnostic boxes, no mAP
                continue
            for item, index in STATS_INDEX.items():
                key = f"{evaluation.params.iouType}_{item}"
                if key in metrics:
                    metrics[key] = float(evaluation.stats[index])
        return metrics


def full_precision(evaluators: Any) -> None:
    """Makes every ``CocoMetric`` among an evaluator config's metrics (one dict or a list) a full-precision one."""
    for metric in as_list(evaluators):
        if metric.get("type") == COCO_METRIC:
            metric["type"] = FULL_PRECISION_COCO_METRIC


def plain_mmdet(evaluators: Any) -> None:
    """The reverse of :func:`full_precision`, for a config read outside dettune (where the subclass is unknown)."""
    for metric in as_list(evaluators):
        if metric.get("type") == FULL_PRECISION_COCO_METRIC:
            metric["type"] = COCO_METRIC


@contextlib.contextmanager
def _remembering_evaluations(into: list[Any]) -> Iterator[None]:
    originals = {name: getattr(coco_metric, name) for name in _EVALUATORS}
    for name, original in originals.items():
        setattr(coco_metric, name, _remembering(original, into))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(coco_metric, name, original)


def _remembering(evaluator: type, into: list[Any]) -> type:
    class Remembered(evaluator):  # type: ignore[valid-type, misc]
        def summarize(self) -> None:
            super().summarize()
            into.append(self)

    return Remembered
