"""Which knobs mattered: fANOVA over the trials MLflow holds (pure logic over TrialRecords)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

from mlflow.tracking import MlflowClient

from results.importance import MIN_TRIALS, knob_importances
from results.report import write_report
from results.store import Point, TrialRecord, open_search, open_tracking
from search.tracking import Tracker
from spaces.schema import Space

KNOBS = {"lr": {"loguniform": [0.001, 0.1]}, "scale": {"choice": [[128, 128], [160, 160]]},
         "schedule": {"choice": ["step", "cosine"]}}


def _space(knobs: dict[str, object] = KNOBS) -> Space:
    return Space.from_json({
        "name": "imp", "base": "mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py",
        "data": {"root": "data/synth", "train": "train.json", "val": "val.json"},
        "budget": {"epochs": 2, "trials": 24}, "search": {"algorithm": "tpe", "seed": 0},
        "space": knobs, "fixed": {"backbone": "r18"}})


def _trial(number: int, params: dict[str, str], best: float | None) -> TrialRecord:
    maps = [] if best is None else [best / 2, best]  # the score is each trial's best epoch
    return TrialRecord(run_id=str(number), exp_num=f"imp-{number}", trial_id=str(number), status="completed",
                       stopped_at=None, failure=None, lb_note=None, params=params,
                       history={"val/bbox_mAP": [Point(e, v, e) for e, v in enumerate(maps, start=1)]})


def _trials_scored_by_lr(count: int) -> list[TrialRecord]:
    """The score is a function of lr alone; scale and schedule are drawn at random, independently of it."""
    rng = random.Random(0)
    trials = []
    for number in range(count):
        lr = 10 ** rng.uniform(-3, -1)
        params = {"lr": str(lr), "scale": rng.choice(["128x128", "160x160"]),
                  "schedule": rng.choice(["step", "cosine"])}
        trials.append(_trial(number, params, best=0.3 - 0.05 * (math.log10(lr) + 2) ** 2))
    return trials


def test_the_knob_the_score_depends_on_gets_nearly_all_the_variance() -> None:
    importances = knob_importances(_space(), _trials_scored_by_lr(24))

    assert importances is not None and importances.trials == 24
    assert set(importances.shares) == set(KNOBS)
    assert math.isclose(sum(importances.shares.values()), 1.0)
    assert list(importances.shares)[0] == "lr" and importances.shares["lr"] > 0.8, importances.shares
    assert importances.metrics()["importance/lr"] == importances.shares["lr"]


def test_trials_without_a_score_or_outside_the_space_do_not_count() -> None:
    trials = _trials_scored_by_lr(MIN_TRIALS)
    trials += [_trial(90, trials[0].params, best=None),  # no epoch scored
               _trial(91, {**trials[0].params, "scale": "999x999"}, best=0.5)]  # a value this space lacks
    importances = knob_importances(_space(), trials)

    assert importances is not None and importances.trials == MIN_TRIALS


def test_too_few_trials_or_a_single_knob_give_no_importances() -> None:
    assert knob_importances(_space(), _trials_scored_by_lr(MIN_TRIALS - 1)) is None
    assert knob_importances(_space({"lr": KNOBS["lr"]}), _trials_scored_by_lr(12)) is None


def test_the_report_states_the_importances_and_logs_them_on_the_parent_run(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "imp")
    tracker.describe_search(tags={}, space_yaml="", space_json=json.dumps(_space().to_json()))
    for trial in _trials_scored_by_lr(8):  # written as the driver's callback writes them
        tracker.start_trial(trial.trial_id, trial.params)
        for point in trial.history["val/bbox_mAP"]:
            tracker.log_epoch(trial.trial_id, {"epoch": point.step, "val/bbox_mAP": point.value})
        tracker.end_trial(trial.trial_id, status="completed")
    tracker.finish_search()

    report = write_report(open_search(open_tracking(uri), "imp"), tmp_path / "report").read_text()

    (line,) = [line for line in report.splitlines() if "결과 원인 분석" in line]
    assert "val/bbox_mAP by fANOVA over 8 trials: lr " in line, line
    parent = MlflowClient(uri).get_run(tracker.parent_run_id).data.metrics
    shares = {key.removeprefix("importance/"): value for key, value in parent.items() if key.startswith("importance/")}
    assert set(shares) == set(KNOBS) and math.isclose(sum(shares.values()), 1.0)
    assert max(shares, key=shares.__getitem__) == "lr"
    assert (tmp_path / "report" / "plots" / "importances.png").read_bytes().startswith(b"\x89PNG")
