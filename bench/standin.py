"""A stand-in for training, for bench/scale.py only: a trial that sleeps instead of training.

It sleeps as long as a real trial of the tiny Faster R-CNN would, scaled to ``epoch_s`` seconds per epoch:
bench/overhead.py measured a reused trial process reaching its first iteration in 2.2 s and each epoch taking
3.0 s, so a (re)started trial first sleeps ``SETUP_PER_EPOCH`` epochs' worth. After each epoch it reports the
experiment log's full row of a Cascade R-CNN trial (val mAPs, every stage loss/acc, lr, FPS after the first and
the last epoch, GFLOPs and parameters at epoch 1), values from a learning curve seeded by the trial's knobs, with
a checkpoint holding its epoch, so a retried trial resumes after its last reported epoch as the real one does.

Each trial keeps its own record, one JSON line per event in ``record/<trial_id>.jsonl``: ``start`` when its
process (re)starts, every reported ``epoch`` with its row and the time it reported it, ``end`` when it returns.
bench/scale.py checks MLflow against that record.
"""

from __future__ import annotations

import json
import math
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import ray.tune
from ray.tune import Checkpoint

from search.rung import with_rung_score
from search.trainable import TrialFunction, TrialPlan

SETUP_PER_EPOCH = 2.2 / 3.0
"""A trial's start-up against one epoch, as bench/overhead.py measured them (2.2 s to the first iteration, 3.0 s
per epoch on 48 images)."""
EPOCH_FILE = "epoch.json"
STAGES = 3  # Cascade R-CNN's RoI head stages: the widest row the log has


def make_standin(epoch_s: float, record: Path) -> TrialFunction:
    """The stand-in trial function, sleeping ``epoch_s`` per epoch and recording into folder ``record``."""

    def standin_trial(config: dict[str, Any], plan: TrialPlan) -> None:
        trial_id = ray.tune.get_context().get_trial_id()
        epochs = plan.parsed_space.budget.epochs
        log = record / f"{trial_id}.jsonl"
        done = _restored_epoch(ray.tune.get_checkpoint())
        _append(log, {"event": "start", "time": time.time(), "from_epoch": done})
        time.sleep(SETUP_PER_EPOCH * epoch_s)
        for epoch in range(done + 1, epochs + 1):
            time.sleep(epoch_s)
            row = with_rung_score(curve_row(config, epoch, epochs), plan.parsed_space)  # as the real trial reports
            _append(log, {"event": "epoch", "time": time.time(), "epoch": epoch, "row": row})
            with tempfile.TemporaryDirectory(prefix="standin-") as directory:
                (Path(directory) / EPOCH_FILE).write_text(json.dumps(epoch))
                ray.tune.report(row, checkpoint=Checkpoint.from_directory(directory))
        _append(log, {"event": "end", "time": time.time()})

    return standin_trial


def curve_row(config: dict[str, Any], epoch: int, epochs: int) -> dict[str, float]:
    """The log's row at ``epoch``: the same for the same knobs and epoch, whichever process computes it."""
    knobs = json.dumps(config, sort_keys=True, default=str)
    trial = random.Random(knobs)
    ceiling, pace = trial.uniform(0.15, 0.55), trial.uniform(1.0, 4.0)
    if "lr" in config:  # a bowl around lr 0.01, so the searcher has something to find
        ceiling *= max(0.2, 1.0 - 0.35 * abs(math.log10(float(config["lr"]) / 0.01)))
    noise = random.Random(f"{knobs}/{epoch}")
    mAP = max(0.0, ceiling * (1.0 - math.exp(-epoch / pace)) + noise.gauss(0.0, 0.004))
    loss = 2.5 * math.exp(-epoch / (pace + 1.0)) + 0.3 + noise.uniform(0.0, 0.02)
    row = {"epoch": float(epoch), "val/bbox_mAP": mAP, "val/bbox_mAP_50": min(1.0, 1.6 * mAP),
           "val/bbox_mAP_75": 0.9 * mAP, "val/bbox_mAP_s": 0.5 * mAP, "val/bbox_mAP_m": mAP,
           "val/bbox_mAP_l": min(1.0, 1.3 * mAP), "train/loss": loss, "train/loss_rpn_cls": 0.1 * loss,
           "train/loss_rpn_bbox": 0.05 * loss, "train/lr": 0.02 * 0.5 * (1 + math.cos(math.pi * epoch / epochs))}
    for stage in range(STAGES):
        weight = (1.0, 0.5, 0.25)[stage]
        row |= {f"train/s{stage}.loss_cls": 0.2 * weight * loss, f"train/s{stage}.loss_bbox": 0.15 * weight * loss,
                f"train/s{stage}.acc": min(100.0, 60.0 + 100.0 * mAP)}
    if epoch in (1, epochs):
        row["inference/fps"] = trial.uniform(5.0, 30.0) + noise.uniform(-0.5, 0.5)
    if epoch == 1:
        row |= {"model/gflops": trial.uniform(80.0, 250.0), "model/params_M": trial.uniform(40.0, 70.0)}
    return row


def _restored_epoch(checkpoint: Checkpoint | None) -> int:
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as directory:
        return int(json.loads((Path(directory) / EPOCH_FILE).read_text()))


def _append(log: Path, entry: dict[str, Any]) -> None:
    with log.open("a") as file:
        file.write(json.dumps(entry) + "\n")
