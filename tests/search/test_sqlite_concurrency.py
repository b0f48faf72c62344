"""Concurrent trials and one local SQLite MLflow store: no "database is locked", no lost or doubled point.

The driver is the store's only writer by design: a real search with four trials at once shows that four
concurrent trials never make it trip. A stress test then writes from four processes at once, each with its
own :class:`~search.tracking.Tracker`, to show the store survives even if several writers appear.
"""

from __future__ import annotations

import multiprocessing
import traceback
from pathlib import Path
from typing import Any

import pytest
from conftest import runs_of, write_space
from mlflow.tracking import MlflowClient
from ray.tune import ExperimentAnalysis

from cocodata.dataset import Dataset
from search.driver import SearchOptions, run_search
from search.tracking import Tracker
from tracking_names import TAG_STATUS, TAG_TRIAL, local_tracking_uri

LOCKED = "database is locked"
TRIALS = 4
EPOCHS = 2
STRESS_EPOCHS = 50
LOG_SUFFIXES = (".log", ".txt", ".out", ".err", ".json", ".csv")


def _steps(client: MlflowClient, run: Any) -> dict[str, list[int]]:
    return {key: [m.step for m in client.get_metric_history(run.info.run_id, key)] for key in run.data.metrics}


def _overlap(intervals: list[tuple[float, float]]) -> bool:
    """Whether all the intervals share a moment: every one started before any ended."""
    return max(start for start, _ in intervals) < min(end for _, end in intervals)


def _logs_mentioning(directory: Path, text: str) -> list[Path]:
    return [path for path in directory.rglob("*") if path.is_file() and path.suffix in LOG_SUFFIXES
            and text in path.read_text(errors="ignore")]


@pytest.mark.slow
def test_four_concurrent_trials_share_the_sqlite_store(tmp_path: Path, synth: Dataset, ray_local: None,
                                                       capfd: pytest.CaptureFixture[str]) -> None:
    space_file = write_space(tmp_path / "space.yaml", synth, name="four",
                             search={"algorithm": "random", "seed": 0},
                             budget={"trials": TRIALS, "max_concurrent": TRIALS, "epochs": EPOCHS,
                                     "cpus_per_worker": 1})
    outcome = run_search(SearchOptions(space_file=space_file, storage=tmp_path / "runs"))
    out, err = capfd.readouterr()

    assert outcome.tracking_uri == local_tracking_uri(tmp_path / "runs")
    client = MlflowClient(outcome.tracking_uri)
    runs = runs_of(outcome.tracking_uri, "four")
    trials = ExperimentAnalysis(str(outcome.experiment_dir)).trials
    assert len(runs) == TRIALS and {r.data.tags[TAG_TRIAL] for r in runs} == {t.trial_id for t in trials}

    assert _overlap([(r.info.start_time, r.info.end_time) for r in runs]), "the MLflow runs did not overlap"
    ray_spans = []
    for trial in trials:
        last = trial.last_result
        ray_spans.append((last["timestamp"] - last["time_total_s"], last["timestamp"]))
    assert _overlap(ray_spans), f"the Ray trials did not run at the same time: {ray_spans}"

    for run in runs:
        assert run.data.tags[TAG_STATUS] == "completed" and run.info.status == "FINISHED"
        steps = _steps(client, run)
        assert "train/loss" in steps and "val/bbox_mAP" in steps
        for key, logged in steps.items():  # FPS after the first and the last epoch, the model's costs once
            expected = {"inference/": sorted({1, EPOCHS}), "model/": [1]}.get(key.split("/")[0] + "/")
            assert logged == (expected or list(range(1, EPOCHS + 1))), key

    assert LOCKED not in out + err
    assert _logs_mentioning(outcome.experiment_dir, LOCKED) == []


def write_trial(tracking_uri: str, search: str, index: int, start: Any, errors: Any) -> None:
    """One writer process: its own Tracker, one trial, :data:`STRESS_EPOCHS` epochs, then the end tag."""
    try:
        start.wait(timeout=120)
        tracker = Tracker(tracking_uri, search)
        trial = f"trial{index}"
        tracker.start_trial(trial, {"lr": 0.01 * (index + 1)})
        for epoch in range(1, STRESS_EPOCHS + 1):
            tracker.log_epoch(trial, {"epoch": epoch, "train/loss": index + 1 / epoch,
                                      "val/bbox_mAP": epoch / 100, "train/lr": 0.01 * (index + 1)})
        tracker.end_trial(trial, status="completed")
    except BaseException:
        errors.put(traceback.format_exc())
        raise


def test_four_processes_with_their_own_trackers_all_land(tmp_path: Path,
                                                         capfd: pytest.CaptureFixture[str]) -> None:
    tracking_uri = local_tracking_uri(tmp_path)
    # The driver makes the search's experiment and parent run before any trial exists; so does this test.
    Tracker(tracking_uri, "stress")
    context = multiprocessing.get_context("spawn")  # no fork of a process that may hold Ray's threads
    start, errors = context.Barrier(TRIALS), context.Queue()
    writers = [context.Process(target=write_trial, args=(tracking_uri, "stress", index, start, errors))
               for index in range(TRIALS)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(timeout=300)
        if writer.is_alive():  # hung: leave nothing behind, the exit code below fails the test
            writer.kill()
    failures = []
    while not errors.empty():
        failures.append(errors.get())
    assert failures == [] and [w.exitcode for w in writers] == [0] * TRIALS, "\n".join(failures)
    out, err = capfd.readouterr()
    assert LOCKED not in out + err

    client = MlflowClient(tracking_uri)
    runs = runs_of(tracking_uri, "stress")
    assert sorted(r.data.tags[TAG_TRIAL] for r in runs) == [f"trial{i}" for i in range(TRIALS)]
    for run in runs:
        index = int(run.data.tags[TAG_TRIAL].removeprefix("trial"))
        assert run.data.tags[TAG_STATUS] == "completed" and run.info.status == "FINISHED"
        assert run.data.params["lr"] == str(0.01 * (index + 1))
        steps = _steps(client, run)
        assert set(steps) == {"train/loss", "val/bbox_mAP", "train/lr"}
        assert all(s == list(range(1, STRESS_EPOCHS + 1)) for s in steps.values()), steps
        losses = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/loss")}
        assert losses == {epoch: index + 1 / epoch for epoch in range(1, STRESS_EPOCHS + 1)}
