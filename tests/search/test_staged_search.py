"""Staged searches for real: inheritance read back from a real MLflow store, a warm-started Optuna study, and a
chain of two searches whose driver is killed in the second and continued."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
from conftest import runs_of, write_space
from mlflow.tracking import MlflowClient

from cocodata.dataset import Dataset
from search.cli import main
from search.driver import SearchOptions, make_searcher, run_search
from search.staging import stage_from_store
from search.tracking import Tracker
from spaces.schema import load_space
from tracking_names import TAG_INHERITED, TAG_STATUS, TAG_TRIAL, local_tracking_uri

METRIC = "val/bbox_mAP_50"  # write_space's metric


def _best_params(tracking_uri: str, name: str) -> list[dict[str, str]]:
    """The params of the completed trials with the best score (all of them if several tie)."""
    client = MlflowClient(tracking_uri)
    scores = {run.info.run_id: max(m.value for m in client.get_metric_history(run.info.run_id, METRIC))
              for run in runs_of(tracking_uri, name) if run.data.tags[TAG_STATUS] == "completed"}
    top = max(scores.values())
    return [run.data.params for run in runs_of(tracking_uri, name) if scores.get(run.info.run_id) == top]


def test_inherit_gives_every_trial_the_earlier_best_values_and_fixed_wins(
        tmp_path: Path, synth: Dataset, ray_local: None, capfd: pytest.CaptureFixture[str]) -> None:
    storage = tmp_path / "runs"
    first = write_space(tmp_path / "a.yaml", synth, name="stage-a", search={"algorithm": "grid", "seed": 0},
                        budget={"epochs": 1, "trials": 1, "max_concurrent": 2},
                        space={"lr": {"grid": [0.005, 0.01, 0.03]}})
    second = write_space(tmp_path / "b.yaml", synth, name="stage-b", search={"algorithm": "grid", "seed": 0},
                         budget={"epochs": 1, "trials": 1, "max_concurrent": 2}, inherit="stage-a",
                         space={"schedule": {"grid": ["step", "cosine"]}}, fixed={"batch_size": 2})
    uri = run_search(SearchOptions(space_file=first, storage=storage)).tracking_uri
    best = _best_params(uri, "stage-a")

    run_search(SearchOptions(space_file=second, storage=storage))

    trials = runs_of(uri, "stage-b")
    assert sorted(run.data.params["schedule"] for run in trials) == ["cosine", "step"]
    for run in trials:
        params = run.data.params
        assert params["lr"] in {p["lr"] for p in best}
        assert {k: params[k] for k in ("backbone", "preset", "scale", "optimizer")} == {
            "backbone": "r18", "preset": "tiny", "scale": "160x160", "optimizer": "sgd"}
        assert params["batch_size"] == "2", "the explicit fixed value must win over stage-a's 4"
    [parent] = runs_of(uri, "stage-b", role="parent")
    assert f"lr = {trials[0].data.params['lr']}  from stage-a-" in parent.data.tags[TAG_INHERITED]
    assert "batch_size" not in parent.data.tags[TAG_INHERITED]

    capfd.readouterr()
    assert main(["report", "stage-b", "--tracking-uri", uri, "--out", str(tmp_path / "report")]) == 0
    assert "  - inherited: " in (tmp_path / "report" / "report.md").read_text()
    assert main(["validate", str(second), "--storage", str(storage)]) == 0
    assert f"inherited   lr = {trials[0].data.params['lr']}  from stage-a-" in capfd.readouterr().out


def _record_search(uri: str, artifacts: Path, space_file: Path, trials: list[tuple[float, str, list[float]]]) -> None:
    """Writes an earlier search to MLflow with the driver's own Tracker: (lr, status, metric by epoch) per trial."""
    space = load_space(space_file)
    tracker = Tracker(uri, space.name, artifact_root=artifacts)
    tracker.describe_search(tags={}, space_yaml=space_file.read_text(), space_json=json.dumps(space.to_json()))
    for number, (lr, status, maps) in enumerate(trials):
        trial_id = f"earlier{number}"
        tracker.start_trial(trial_id, {**space.point_defaults(), "lr": lr})
        for epoch, value in enumerate(maps, start=1):
            tracker.log_epoch(trial_id, {"epoch": epoch, METRIC: value, "train/loss": 1.0})
        tracker.end_trial(trial_id, status=status, stopped_at=len(maps) if status == "stopped" else None)
    tracker.finish_search()


def test_warm_start_puts_earlier_trials_into_the_study_before_the_first_proposal(
        tmp_path: Path, synth: Dataset) -> None:
    uri = local_tracking_uri(tmp_path)
    earlier = write_space(tmp_path / "a.yaml", synth, name="warm-a", budget={"epochs": 2, "trials": 3},
                          space={"lr": {"loguniform": [0.001, 1.0]}})
    _record_search(uri, tmp_path / "mlartifacts", earlier, [(0.01, "completed", [0.1, 0.3]),
                                                            (0.02, "stopped", [0.2]),
                                                            (0.5, "completed", [0.05, 0.4])])
    later = write_space(tmp_path / "b.yaml", synth, name="warm-b", budget={"epochs": 2, "trials": 3},
                        space={"lr": {"loguniform": [0.001, 0.1]}}, warm_start=["warm-a"])
    staged = stage_from_store(load_space(later), uri)
    searcher, _, _ = make_searcher(staged.space, staged)

    first = searcher.suggest("t0")

    study = searcher.searcher.study
    told = [(t.state, t.value, t.intermediate_values, t.params) for t in study.trials[:2]]
    assert told == [(optuna.trial.TrialState.COMPLETE, 0.3, {1: 0.1, 2: 0.3}, {"lr": 0.01}),
                    (optuna.trial.TrialState.PRUNED, None, {1: 0.2}, {"lr": 0.02})]
    assert len(study.trials) == 3 and study.trials[2].state == optuna.trial.TrialState.RUNNING
    assert study.trials[2].params == first and 0.001 <= first["lr"] <= 0.1
    [left_out] = staged.warm.left_out
    assert left_out.trial == "warm-a-3" and "lr 0.5 is outside" in left_out.reason


def _snapshot(tracking_uri: str, name: str, storage: Path) -> dict[str, Any]:
    """A search's MLflow runs (every metric point, status, end time) and its trial folders' files."""
    client = MlflowClient(tracking_uri)
    runs = {run.data.tags[TAG_TRIAL]: (run.info.end_time, run.data.tags[TAG_STATUS],
                                       {k: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, k)]
                                        for k in run.data.metrics})
            for run in runs_of(tracking_uri, name)}
    files = {str(p.relative_to(storage)): p.stat().st_mtime_ns for p in (storage / name / "trials").rglob("*")}
    return {"runs": runs, "files": files}


def _mid_epoch(storage: Path, name: str, epoch: int) -> bool:
    return any(f"Epoch(train) [{epoch}]" in log.read_text(errors="ignore")
               for log in (storage / name).glob("trials/*/rank0/trial.log"))


@pytest.mark.slow
def test_a_chain_killed_in_its_second_search_continues_without_rerunning_the_first(
        tmp_path: Path, synth: Dataset) -> None:
    first = write_space(tmp_path / "a.yaml", synth, name="chain-a", search={"algorithm": "grid", "seed": 0},
                        budget={"epochs": 1, "trials": 1, "max_concurrent": 2}, space={"lr": {"grid": [0.01, 0.02]}})
    write_space(tmp_path / "b.yaml", synth, name="chain-b", search={"algorithm": "grid", "seed": 0},
                budget={"epochs": 2, "trials": 1, "max_concurrent": 1}, inherit="chain-a", fixed={},
                space={"schedule": {"grid": ["step", "cosine"]}})
    storage, log = tmp_path / "runs", tmp_path / "chain.log"
    with log.open("w") as out:
        driver = subprocess.Popen([sys.executable, "-m", "search", "search", first.name, "b.yaml"], cwd=tmp_path,
                                  stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 600
    while not _mid_epoch(storage, "chain-b", 2) and driver.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    output = log.read_text()
    assert "chain 2/2: b.yaml" in output, output[-3000:]
    uri = local_tracking_uri(storage)
    before = _snapshot(uri, "chain-a", storage)
    assert len(before["runs"]) == 2 and all(status == "completed" for _, status, _ in before["runs"].values())

    command = output.split("chain 2/2: b.yaml  (if it stops, continue with: ")[1].split(")\n")[0]
    assert command == "dettune search b.yaml --resume"
    resumed = subprocess.run([sys.executable, "-m", "search", *shlex.split(command)[1:]], cwd=tmp_path,
                             capture_output=True, text=True, timeout=900)

    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert _snapshot(uri, "chain-a", storage) == before, "the first search changed"
    best_lr = {p["lr"] for p in _best_params(uri, "chain-a")}
    second = runs_of(uri, "chain-b")
    assert sorted(run.data.params["schedule"] for run in second) == ["cosine", "step"]
    for run in second:
        assert run.data.tags[TAG_STATUS] == "completed" and run.data.params["lr"] in best_lr
        steps = [m.step for m in MlflowClient(uri).get_metric_history(run.info.run_id, "train/loss")]
        assert steps == [1, 2], steps


def test_bad_earlier_searches_are_refused_before_anything_is_written(
        tmp_path: Path, synth: Dataset, capfd: pytest.CaptureFixture[str]) -> None:
    storage = tmp_path / "runs"
    uri = local_tracking_uri(storage)
    unknown = write_space(tmp_path / "u.yaml", synth, name="needs-x", inherit="x")
    assert main(["search", str(unknown), "--storage", str(storage)]) == 2
    assert "inherit: no search named 'x'" in capfd.readouterr().err and not storage.exists()

    assert main(["validate", str(unknown), "--storage", str(storage)]) == 0  # a chain not run yet: a note
    assert "pending     x: not in the tracking store yet" in capfd.readouterr().out

    earlier = write_space(tmp_path / "a.yaml", synth, name="unfinished", budget={"epochs": 2, "trials": 1})
    _record_search(uri, tmp_path / "mlartifacts", earlier, [(0.01, "stopped", [0.1])])
    for sections, message in (({"inherit": "unfinished"}, "unfinished has no completed trial"),
                              ({"inherit": "unfinished", "mode": "min"}, "maximises val/bbox_mAP_50 but this")):
        space_file = write_space(tmp_path / "b.yaml", synth, name="b", **sections)
        for command in ("search", "validate"):
            assert main([command, str(space_file), "--storage", str(storage)]) == 2
            err = capfd.readouterr().err
            assert message in err and "Traceback" not in err
    assert not (storage / "b").exists()


def test_a_grid_search_skips_points_an_earlier_search_trained_to_the_full_budget(
        tmp_path: Path, synth: Dataset, ray_local: None) -> None:
    storage = tmp_path / "runs"
    uri = local_tracking_uri(storage)
    grid = {"search": {"algorithm": "grid", "seed": 0}, "budget": {"epochs": 1, "trials": 1}}
    earlier = write_space(tmp_path / "a.yaml", synth, name="grid-a", space={"lr": {"grid": [0.01, 0.03]}}, **grid)
    _record_search(uri, storage / "mlartifacts", earlier, [(0.01, "completed", [0.1]), (0.03, "failed", [])])
    later = write_space(tmp_path / "b.yaml", synth, name="grid-b", space={"lr": {"grid": [0.01, 0.02, 0.03]}},
                        warm_start=["grid-a"], **grid)

    run_search(SearchOptions(space_file=later, storage=storage))

    assert sorted(run.data.params["lr"] for run in runs_of(uri, "grid-b")) == ["0.02", "0.03"]
