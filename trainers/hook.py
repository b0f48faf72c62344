"""The one mmengine Hook that joins training to the search: it reports after every validation epoch."""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from mmengine.hooks import Hook

from spaces.objectives import FPS_METRIC
from trainers.cost import model_cost
from trainers.inference import measure_fps
from trainers.metrics import EPOCH, VAL_PREFIX, non_finite, train_metrics, val_metrics

Report = Callable[[dict[str, float], Path], None]
"""Receives one epoch's flat metrics and the checkpoint saved at the end of that epoch."""

FIRST_ITER_MARK = "dettune: first training iteration done at unix time"


class TrialDiverged(RuntimeError):
    """The loss became NaN or infinite: the trial cannot recover, and retrying it would diverge again."""


class EpochReportHook(Hook):
    """Collects epoch means of the train losses and lr, joins them with the val metrics, and reports.

    ``empty_scores`` stands in for the val columns when the evaluator returns none because nothing was
    detected. Runs at ``LOWEST`` priority so mmengine's own CheckpointHook has already saved the epoch's checkpoint.
    Under DDP every rank calls ``report`` (Ray Train expects all workers to report) with the same values:
    the train means are averaged over ranks first. After the first and the last epoch the row also holds the
    inference speed on the val set (``inference/fps``, each rank on its own device), so a trial ASHA stops early
    has one too; the first epoch's row holds the model's machine-independent costs (:func:`~trainers.cost.model_cost`).
    """

    priority = "LOWEST"

    def __init__(self, report: Report, *, empty_scores: Mapping[str, float]) -> None:
        self._report = report
        self._empty_scores = dict(empty_scores)
        self._started = False
        self._sums: dict[str, float] = defaultdict(float)
        self._count = 0

    def before_train_epoch(self, runner: Any) -> None:
        self._sums.clear()
        self._count = 0

    def after_train_iter(self, runner: Any, batch_idx: int, data_batch: Any = None,
                         outputs: Mapping[str, Any] | None = None) -> None:
        for key, value in (outputs or {}).items():
            self._sums[key] += float(value.detach()) if torch.is_tensor(value) else float(value)
        if not self._started:  # start-up overhead, for bench/overhead and for users reading trial.log
            self._started = True
            runner.logger.info(f"{FIRST_ITER_MARK} {time.time():.3f}")
        if not math.isfinite(self._sums.get("loss", 0.0)):
            raise TrialDiverged(f"loss became {self._sums['loss']} in epoch {runner.epoch + 1}, "
                                f"iteration {batch_idx + 1}: lower the lr or add gradient clipping")
        self._sums["lr"] += float(runner.optim_wrapper.get_lr()["lr"][0])
        self._count += 1

    def after_val_epoch(self, runner: Any, metrics: Mapping[str, float] | None = None) -> None:
        epoch = int(runner.epoch)
        sums, count = self._summed_over_ranks()
        val = val_metrics(metrics or {})
        if not any(key.startswith(VAL_PREFIX + "bbox_mAP") for key in val):
            val.update(self._empty_scores)
        row = {**train_metrics(sums, count), **val, EPOCH: float(epoch)}
        if epoch == 1:
            row.update(model_cost(runner.model, runner.val_dataloader.dataset))
        if epoch in (1, runner.max_epochs):
            row[FPS_METRIC] = measure_fps(runner.model, runner.val_dataloader.dataset)
        bad = non_finite(row)
        if bad:  # never hand a NaN to ASHA (ray#6659) or MLflow
            raise TrialDiverged(f"non-finite {', '.join(bad)} after epoch {epoch}")
        self._report(row, Path(runner.work_dir) / f"epoch_{epoch}.pth")

    def _summed_over_ranks(self) -> tuple[dict[str, float], int]:
        keys = sorted(self._sums)
        values = torch.tensor([self._sums[k] for k in keys] + [float(self._count)], dtype=torch.float64)
        if dist.is_available() and dist.is_initialized():
            if dist.get_backend() == "nccl":
                values = values.cuda()
            dist.all_reduce(values)
        *sums, count = values.tolist()
        return dict(zip(keys, sums, strict=True)), int(count)
