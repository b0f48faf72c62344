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
        diverged = _non_finite_losses_on_ranks(float((outputs or {}).get("loss", 0.0)))
        if diverged:
            raise TrialDiverged(f"loss became {_ranks_text(diverged)} in epoch {runner.epoch + 1}, "
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
        *sums, count = _all_ranks_sum([self._sums[k] for k in keys] + [float(self._count)])
        return dict(zip(keys, sums, strict=True)), int(count)


def _non_finite_losses_on_ranks(loss: float) -> dict[int, float]:
    """This iteration's non-finite losses by rank, the same on every rank.

    Every rank must agree: a rank that stopped alone would leave the others waiting in DDP's next gradient
    all-reduce until the process group times out (30 minutes). So each rank shares its loss every iteration
    (one small all-reduce, after the optimizer step, where all ranks are in step) and all stop together.
    """
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    losses = [0.0] * world
    losses[rank] = loss  # the other ranks add 0.0 to this slot, so the sum is this rank's loss, NaN included
    return {r: value for r, value in enumerate(_all_ranks_sum(losses)) if not math.isfinite(value)}


def _ranks_text(losses: Mapping[int, float]) -> str:
    """``"nan"`` alone, or ``"nan on rank 1"`` when training is distributed."""
    values = ", ".join(f"{value} on rank {rank}" for rank, value in losses.items())
    return values if dist.is_available() and dist.is_initialized() else str(next(iter(losses.values())))


def _all_ranks_sum(values: list[float]) -> list[float]:
    """Element-wise sum over all ranks (the values themselves without a process group)."""
    tensor = torch.tensor(values, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        if dist.get_backend() == "nccl":
            tensor = tensor.cuda()
        dist.all_reduce(tensor)
    return [float(v) for v in tensor.tolist()]
