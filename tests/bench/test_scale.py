"""bench/scale.py in small: a 3-node Ray cluster, an MLflow server on PostgreSQL, ~50 stand-in trials, one node
killed and one server outage during the search; MLflow must hold every reported point exactly once."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.scale import Settings, run
from bench.scale_check import PRIMARY, Store, TrialRecord, problems_of

TRIALS = 50


@pytest.mark.slow
def test_every_point_lands_once_through_a_node_kill_and_a_server_outage(tmp_path: Path, no_local_ray: None) -> None:
    settings = Settings(trials=TRIALS, nodes=3, gpus_per_node=2, gpus_per_trial=1, epochs=3, epoch_s=0.6,
                        chaos=True, kill_every_s=15.0, node_kills=1, node_down_s=5.0, outage_s=10.0,
                        driver_kill=False)
    done = run(settings, tmp_path)
    assert done.problems == []
    assert done.figures.trials == TRIALS
    assert sum("SIGKILL node" in fault for fault in done.faults) == 1, done.faults
    assert any("MLflow server down" in fault for fault in done.faults), done.faults
    retried = [log for log in (tmp_path / "record").glob("*.jsonl") if log.read_text().count('"start"') > 1]
    assert retried, "no trial ran on the killed node: the kill proved nothing"


def test_the_check_finds_a_doubled_a_missing_and_a_wrong_point() -> None:
    row = {"epoch": 1.0, PRIMARY: 0.25, "train/loss": 1.5}
    record = {"a": TrialRecord([0.0], [2.0], {1: [(1.0, row)]}), "b": TrialRecord([0.0], [2.0], {1: [(1.0, row)]})}
    good = [(PRIMARY, 1, 0.25, 1000), ("train/loss", 1, 1.5, 1000)]
    store = Store([("ra", "a", "completed", "FINISHED"), ("rb", "b", "stopped", "FINISHED")], {PRIMARY: 0.25},
                  {"ra": good, "rb": good})
    assert problems_of(store, record) == []
    doubled = Store(store.trial_runs, store.parent_metrics, {"ra": [*good, good[0]], "rb": good})
    assert problems_of(doubled, record) == [f"trial a: {PRIMARY} at epoch 1 written 2 times"]
    missing = Store(store.trial_runs, store.parent_metrics, {"ra": good, "rb": good[:1]})
    assert problems_of(missing, record) == ["trial b: train/loss at epoch 1 missing"]
    wrong = Store(store.trial_runs, store.parent_metrics, {"ra": good, "rb": [(PRIMARY, 1, 0.3, 1000), good[1]]})
    assert problems_of(wrong, record) == [f"trial b: {PRIMARY} at epoch 1 is 0.3, not 0.25"]
    pending = Store([("ra", "a", "running", "RUNNING"), *store.trial_runs[1:]], store.parent_metrics, store.points)
    assert problems_of(pending, record) == ["trial a: still pending (running, RUNNING)"]
    no_run = Store(store.trial_runs[:1], store.parent_metrics, {"ra": good})
    assert problems_of(no_run, record) == ["trial b: reported, but has no run"]
    started_only = {**record, "c": TrialRecord([0.0], [], {})}  # lost with a killed driver before it reported
    assert problems_of(store, started_only) == []
