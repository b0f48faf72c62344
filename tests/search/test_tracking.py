"""The MLflow bookkeeping on a real SQLite store, without Ray: the best trial on the parent, filter strings, the
runs view, and two drivers creating the same search at once."""

from __future__ import annotations

import json
import multiprocessing
import os
import traceback
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

from search.tracking import Tracker, TrackingSettings
from spaces.errors import BadArgument
from tracking_names import (
    TAG_EXP_NUM,
    TAG_ROLE,
    TAG_SEARCH,
    TAG_STATUS,
    TAG_TRIAL,
    local_tracking_uri,
    run_filter,
    use_credentials,
    use_database_credentials,
)

TRIALS_PER_DRIVER = 4


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_the_same_best_recorded_again_writes_no_point_twice(tmp_path: Path) -> None:
    tracker = Tracker(local_tracking_uri(tmp_path), "best")
    for _ in range(2):  # the end of a search, then the end of its resume
        tracker.record_best({"lr": 0.01, "scale": [800, 800]}, {"val/bbox_mAP": 0.3, "epoch": 2}, epoch=2,
                            trial_id="a")

    parent = tracker.client.get_run(tracker.parent_run_id)
    assert _history(tracker.client, tracker.parent_run_id, "val/bbox_mAP") == [(2, 0.3)]
    assert parent.data.tags["dettune.best.scale"] == "800x800" and parent.data.tags["dettune.best.lr"] == "0.01"


def test_a_search_experiment_is_recorded_as_model_training(tmp_path: Path) -> None:
    # MLflow's experiment kind (genai_development, custom_model_development); which view its UI opens is
    # tests/search/test_mlflow_ui.py's concern.
    tracker = Tracker(local_tracking_uri(tmp_path), "view")

    experiment = MlflowClient(local_tracking_uri(tmp_path)).get_experiment(tracker.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_the_runs_view_ranks_by_the_spaces_metric_the_way_its_mode_says(tmp_path: Path) -> None:
    # What the page shows is tests/search/test_mlflow_ui.py's concern; here, a metric to minimise, written twice.
    tracker = Tracker(local_tracking_uri(tmp_path), "view")
    tracker.save_runs_view("val/bbox_mAP", "max")
    tracker.save_runs_view("val/bbox_mAP_s", "min")

    tags = MlflowClient(local_tracking_uri(tmp_path)).get_experiment(tracker.experiment_id).tags
    (key,) = [key for key in tags if key.startswith("mlflow.sharedViewState.")]
    state = json.loads(json.loads(tags[key])["state"])
    assert (state["orderByKey"], state["orderByAsc"]) == ("metrics.`val/bbox_mAP_s`", True)
    columns = state["selectedColumns"]
    assert columns[0] == "metrics.`val/bbox_mAP_s`" and len(set(columns)) == len(columns)
    assert {"metrics.`val/bbox_mAP`", "metrics.`train/loss`", "metrics.`inference/fps`"} <= set(columns)


def test_a_new_best_replaces_the_knob_values_of_the_old_one(tmp_path: Path) -> None:
    tracker = Tracker(local_tracking_uri(tmp_path), "best")
    tracker.record_best({"lr": 0.01, "scale": [800, 800]}, {"val/bbox_mAP": 0.3}, epoch=2, trial_id="a")
    tracker.record_best({"lr": 0.02, "scale": [512, 512]}, {"val/bbox_mAP": 0.4}, epoch=3, trial_id="b")

    tags = tracker.client.get_run(tracker.parent_run_id).data.tags
    assert (tags["dettune.best.lr"], tags["dettune.best.scale"], tags["dettune.best_trial"]) == ("0.02", "512x512", "b")
    assert _history(tracker.client, tracker.parent_run_id, "val/bbox_mAP") == [(2, 0.3), (3, 0.4)]
    assert tracker.client.get_run(tracker.parent_run_id).data.metrics["val/bbox_mAP"] == 0.4


def test_a_filter_value_with_a_quote_is_refused() -> None:
    assert run_filter({TAG_SEARCH: "demo", TAG_ROLE: "trial"}) == (
        "tags.`dettune.search` = 'demo' and tags.`dettune.role` = 'trial'")
    for value in ("it's", 'say "x"', "a`b"):
        with pytest.raises(BadArgument, match="holds a quote"):
            run_filter({TAG_SEARCH: value})


def test_credentials_move_to_mlflows_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)

    assert use_credentials("http://ann:p%40ss@127.0.0.1:5000/mlflow") == "http://127.0.0.1:5000/mlflow"
    assert (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]) == ("ann", "p@ss")


def test_tracking_settings_round_trip(tmp_path: Path) -> None:
    settings = TrackingSettings(uri="http://127.0.0.1:5000", down_timeout_s=42.0,
                                study_uri="postgresql+psycopg://127.0.0.1:5432/optuna")
    settings.save(tmp_path / "search.json")

    assert TrackingSettings.load(tmp_path / "search.json") == settings
    assert TrackingSettings().effective_uri(tmp_path) == local_tracking_uri(tmp_path)
    assert TrackingSettings().effective_study_uri(tmp_path) == f"sqlite:///{tmp_path.resolve() / 'optuna.db'}"


def test_database_credentials_move_to_libpqs_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGUSER", "")
    monkeypatch.setenv("PGPASSWORD", "")

    uri = use_database_credentials("postgresql+psycopg://optuna:p%40ss@127.0.0.1:5432/studies")

    assert uri == "postgresql+psycopg://127.0.0.1:5432/studies"
    assert os.environ["PGUSER"] == "optuna" and os.environ["PGPASSWORD"] == "p@ss"
    with pytest.raises(BadArgument, match="PostgreSQL only"):
        use_database_credentials("mysql://user:secret@127.0.0.1/studies")


def _driver(tracking_uri: str, index: int, start: Any, errors: Any) -> None:
    """One driver process: creates the search (if nobody has yet) and starts its trials."""
    try:
        start.wait(timeout=120)
        tracker = Tracker(tracking_uri, "twice")
        for trial in range(TRIALS_PER_DRIVER):
            tracker.start_trial(f"driver{index}-{trial}", {"lr": 0.01})
    except BaseException:
        errors.put(traceback.format_exc())
        raise


def test_two_drivers_creating_one_search_share_its_parent_and_never_share_a_number(tmp_path: Path) -> None:
    tracking_uri = local_tracking_uri(tmp_path)
    MlflowClient(tracking_uri).search_experiments()  # the store exists (MLflow makes its tables); the search not
    context = multiprocessing.get_context("spawn")
    start, errors = context.Barrier(2), context.Queue()
    drivers = [context.Process(target=_driver, args=(tracking_uri, index, start, errors)) for index in range(2)]
    for driver in drivers:
        driver.start()
    for driver in drivers:
        driver.join(timeout=300)
        if driver.is_alive():
            driver.kill()
    failures = []
    while not errors.empty():
        failures.append(errors.get())
    assert failures == [] and [d.exitcode for d in drivers] == [0, 0], "\n".join(failures)

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("twice")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags[TAG_ROLE] == "parent"]
    trials = [r for r in runs if r.data.tags[TAG_ROLE] == "trial"]
    assert len(parents) == 1
    assert all(t.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for t in trials)
    assert sorted(t.data.tags[TAG_TRIAL] for t in trials) == sorted(
        f"driver{d}-{t}" for d in range(2) for t in range(TRIALS_PER_DRIVER))
    numbers = sorted(int(t.data.tags[TAG_EXP_NUM].removeprefix("twice-")) for t in trials)
    assert numbers == list(range(1, 2 * TRIALS_PER_DRIVER + 1))
    assert all(t.info.run_name == t.data.tags[TAG_EXP_NUM] for t in trials)


def _numbers(tracker: Tracker) -> list[int]:
    return sorted(int(r.data.tags[TAG_EXP_NUM].removeprefix(f"{tracker.search}-")) for r in tracker.trial_runs())


def test_a_store_numbered_before_claims_goes_on_without_a_repeat(tmp_path: Path) -> None:
    tracker = Tracker(local_tracking_uri(tmp_path), "old")
    for n in (1, 2):  # numbered as before claims: an Exp num tag, and no claim on the parent
        tracker.client.create_run(tracker.experiment_id, tags={
            TAG_SEARCH: "old", TAG_ROLE: "trial", TAG_TRIAL: f"old{n}", TAG_EXP_NUM: f"old-{n}",
            "mlflow.parentRunId": tracker.parent_run_id})
    for trial in ("a", "b", "c"):
        tracker.start_trial(trial, {"lr": 0.01})
    assert _numbers(tracker) == [1, 2, 3, 4, 5]


def test_numbering_a_trial_reads_no_other_runs_once_numbers_are_claimed(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Each new trial read every trial run back (O(trials) per trial: minutes at 1,000 trials on a server)."""
    tracker = Tracker(local_tracking_uri(tmp_path), "many")
    tracker.start_trial("first", {"lr": 0.01})
    listed = []
    every_run = tracker.trial_runs
    monkeypatch.setattr(tracker, "trial_runs", lambda: listed.append(1) or every_run())
    for trial in ("a", "b", "c"):
        tracker.start_trial(trial, {"lr": 0.01})
    assert listed == []
    assert _numbers(tracker) == [1, 2, 3, 4]


def test_a_run_left_unnumbered_by_a_lost_server_gets_its_number_and_knobs_on_restart(tmp_path: Path) -> None:
    # What a driver leaves when the server went away right after creating a trial's run: the run, nothing else.
    first = Tracker(local_tracking_uri(tmp_path), "lost")
    first.start_trial("a", {"lr": 0.01})
    first.client.create_run(first.experiment_id, tags={
        TAG_SEARCH: "lost", TAG_ROLE: "trial", TAG_TRIAL: "b", "mlflow.parentRunId": first.parent_run_id})

    again = Tracker(local_tracking_uri(tmp_path), "lost")  # the resumed driver
    run_id = again.start_trial("b", {"lr": 0.02, "scale": [512, 512]})
    again.start_trial("c", {"lr": 0.03})

    run = again.client.get_run(run_id)
    assert run.data.tags[TAG_EXP_NUM] == "lost-2" and run.info.run_name == "lost-2"
    assert run.data.params == {"lr": "0.02", "scale": "512x512"}
    assert _numbers(again) == [1, 2, 3]


def test_a_resumed_driver_writes_the_missing_epochs_once_reading_one_history_per_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [{"epoch": e, "val/bbox_mAP": 0.1 * e, "train/loss": 2.0 - 0.5 * e} for e in (1, 2, 3)]
    rows[0]["inference/fps"] = 12.5  # a column only some epochs have
    killed = Tracker(local_tracking_uri(tmp_path), "resumed")
    delivered = (("a", 2), ("b", 0), ("c", 3))  # epochs the killed driver delivered of each trial
    for trial, written in delivered:
        killed.start_trial(trial, {"lr": 0.01})
        for row in rows[:written]:
            killed.log_epoch(trial, row)
    killed.end_trial("c", status="completed")

    again = Tracker(local_tracking_uri(tmp_path), "resumed")
    listed = again.runs_by_trial()
    reads: list[str] = []
    history = again.client.get_metric_history
    monkeypatch.setattr(again.client, "get_metric_history",
                        lambda run_id, key: reads.append(key) or history(run_id, key))
    monkeypatch.setattr(again, "_find", lambda **tags: pytest.fail(f"searched for {tags} though listed"))
    for trial in ("a", "b", "c", "d"):  # d: a trial the killed driver never started
        again.start_trial(trial, {"lr": 0.01}, listed=listed, every_row_has={"epoch", "val/bbox_mAP", "train/loss"})
        for row in rows:
            again.log_epoch(trial, row)

    monkeypatch.setattr(again.client, "get_run", lambda run_id: pytest.fail("read back an end the listing held"))
    again.end_trial("c", status="stopped", stopped_at=1, only_if_open=True)  # as reconcile asks: c's end stays

    holding_points = [trial for trial, written in delivered if written]
    assert len(reads) == len(holding_points) and set(reads) <= {"val/bbox_mAP", "train/loss"}  # one read a run
    runs = again.runs_by_trial()
    assert sorted(runs) == ["a", "b", "c", "d"]
    for trial, run in runs.items():
        for key in ("val/bbox_mAP", "train/loss"):
            assert [m.step for m in sorted(history(run.info.run_id, key), key=lambda m: m.step)] == [1, 2, 3], (
                trial, key)
        assert [m.step for m in history(run.info.run_id, "inference/fps")] == [1], trial
    assert runs["c"].data.tags[TAG_STATUS] == "completed" and runs["a"].data.tags[TAG_STATUS] == "running"
