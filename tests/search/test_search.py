"""Real searches: Ray Tune in this process, real trials, a real SQLite MLflow store."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import optuna
import pytest
from conftest import runs_of, write_space
from mlflow.tracking import MlflowClient
from ray.tune import ExperimentAnalysis

from cocodata.dataset import Dataset
from search.budget import BUDGET_FILE
from search.cli import main
from search.driver import SearchOptions, SearchOutcome, make_searcher, run_search
from search.tracking import is_tracked
from spaces.schema import SearchSpec, load_space
from tracking_names import (
    STOPPED_BY_BUDGET,
    TAG_BUDGET,
    TAG_ENDED_BECAUSE,
    TAG_EXP_NUM,
    TAG_STATUS,
    TAG_STOPPED_AT,
    TAG_STOPPED_BY,
    TAG_TRIAL,
)
from trainers.hook import FIRST_ITER_MARK
from trainers.trial import TRIAL_LOG

VAL = [f"val/bbox_mAP{s}" for s in ("", "_50", "_75", "_s", "_m", "_l")]
COMMON = ["train/loss", "train/loss_rpn_cls", "train/loss_rpn_bbox", "train/lr"]
HEAD_COLUMNS = {
    "faster": ["train/loss_cls", "train/loss_bbox", "train/acc"],
    "cascade": [f"train/s{i}.{k}" for i in range(3) for k in ("loss_cls", "loss_bbox", "acc")],
}
KNOB_PARAMS = {"backbone", "roi_head", "scale", "lr", "optimizer", "epochs", "batch_size", "preset"}


def _search(tmp_path: Path, dataset: Dataset, **sections: Any) -> tuple[SearchOutcome, MlflowClient, list[Any]]:
    space_file = write_space(tmp_path / "space.yaml", dataset, **sections)
    outcome = run_search(SearchOptions(space_file=space_file, storage=tmp_path / "runs"))
    client = MlflowClient(outcome.tracking_uri)
    experiment = client.get_experiment_by_name(outcome.name)
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    return outcome, client, runs


def _children(runs: list[Any]) -> list[Any]:
    return [r for r in runs if r.data.tags.get("dettune.role") == "trial"]


@pytest.mark.slow
def test_tpe_search_with_asha(tmp_path: Path, synth_large: Dataset, ray_local: None) -> None:
    outcome, client, runs = _search(
        tmp_path, synth_large, name="tpe-asha",
        budget={"epochs": 4, "trials": 6, "max_concurrent": 1},
        scheduler={"type": "asha", "grace_epochs": 1, "reduction_factor": 2},
        space={"lr": {"loguniform": [1.0e-4, 0.04]}, "roi_head": {"choice": ["faster", "cascade"]}},
    )
    parents = [r for r in runs if r.data.tags.get("dettune.role") == "parent"]
    children = _children(runs)
    assert len(parents) == 1 and len(children) == 6
    assert all(c.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for c in children)

    stopped = [c for c in children if c.data.tags[TAG_STATUS] == "stopped"]
    assert stopped, "ASHA stopped no trial"
    for run in stopped:
        assert int(run.data.tags[TAG_STOPPED_AT]) < 4

    assert outcome.best_trial_id and parents[0].data.tags["dettune.best_trial"] == outcome.best_trial_id
    assert "val/bbox_mAP_50" in parents[0].data.metrics and "dettune.best.lr" in parents[0].data.tags
    assert sorted(c.data.tags[TAG_EXP_NUM] for c in children) == sorted(f"tpe-asha-{i}" for i in range(1, 7))

    for child in children:
        head = child.data.params["roi_head"]
        assert set(child.data.params) >= KNOB_PARAMS
        assert set(VAL + COMMON + HEAD_COLUMNS[head]) <= set(child.data.metrics)
        _assert_each_point_once(client, child)

    _assert_ray_and_mlflow_agree(outcome, children)
    _assert_study_copy_matches_mlflow(tmp_path / "runs" / "optuna.db", "tpe-asha", client, children)
    # the view the printed page opens: the trials ranked by the space's metric (write_space's), highest first
    view = json.loads(client.get_experiment(children[0].info.experiment_id).tags["mlflow.sharedViewState.dettune"])
    assert json.loads(view["state"])["orderByKey"] == "metrics.`val/bbox_mAP_50`"
    assert json.loads(view["state"])["orderByAsc"] is False


def _assert_study_copy_matches_mlflow(db: Path, name: str, client: MlflowClient, children: list[Any]) -> None:
    """The study optuna-dashboard opens holds each trial once, with MLflow's params and its best epoch's score
    (write_space's metric, val/bbox_mAP_50)."""
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{db}")
    by_trial = {c.data.tags[TAG_TRIAL]: c for c in children}
    copied = [t.user_attrs["dettune.trial"] for t in study.trials]
    assert sorted(copied) == sorted(by_trial), "each trial is in the study once"
    for trial in study.trials:
        run = by_trial[trial.user_attrs["dettune.trial"]]
        assert trial.state == optuna.trial.TrialState.COMPLETE
        assert trial.params["roi_head"] == run.data.params["roi_head"]
        assert math.isclose(trial.params["lr"], float(run.data.params["lr"]), rel_tol=1e-12)
        history = client.get_metric_history(run.info.run_id, "val/bbox_mAP_50")
        assert trial.value == max(point.value for point in history)


def _assert_each_point_once(client: MlflowClient, run: Any) -> None:
    epochs = None
    for key in run.data.metrics:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert steps == sorted(set(steps)), f"{key}: a step was written twice: {steps}"
        if key == "train/loss":
            epochs = steps
    assert epochs == list(range(1, len(epochs or []) + 1))


def _assert_ray_and_mlflow_agree(outcome: SearchOutcome, children: list[Any]) -> None:
    analysis = ExperimentAnalysis(str(outcome.experiment_dir))
    by_trial = {c.data.tags[TAG_TRIAL]: c for c in children}
    assert set(by_trial) == {t.trial_id for t in analysis.trials}
    for trial in analysis.trials:
        # MLflow's metric is the latest point written; some columns (model/gflops at step 1) are not in every
        # result, so the latest value of each column is taken over all of the trial's results Ray recorded.
        results = analysis.trial_dataframes[trial.trial_id]
        ray_latest = {k: results[k].dropna().iloc[-1] for k in results.columns
                      if is_tracked(k) and results[k].notna().any()}
        mlflow_last = by_trial[trial.trial_id].data.metrics
        assert ray_latest.keys() == mlflow_last.keys()
        for key, value in ray_latest.items():
            assert math.isclose(value, mlflow_last[key], rel_tol=1e-9), key


@pytest.mark.slow
def test_a_time_budget_ends_the_search_on_time_and_resume_with_more_hours_goes_on(
        tmp_path: Path, synth: Dataset, ray_local: None, capsys: pytest.CaptureFixture[str]) -> None:
    # 100 epochs a trial: none can finish. The first trial starts before any epoch time is known; once it reports
    # an epoch, no other trial could reach its last epoch in time, so none starts, and the budget stops the first
    # at the first epoch it reports after the end.
    storage = tmp_path / "runs"
    space_file = write_space(tmp_path / "space.yaml", synth, name="hours",
                             budget={"epochs": 100, "trials": 4, "max_concurrent": 1, "hours": 0.02})
    outcome = run_search(SearchOptions(space_file=space_file, storage=storage))
    budget = json.loads((outcome.experiment_dir / BUDGET_FILE).read_text())
    client = MlflowClient(outcome.tracking_uri)
    first = runs_of(outcome.tracking_uri, "hours")
    assert len(first) == 1, "trials that could not finish in time were started"
    epoch_s = _assert_stopped_at_the_end(client, first[0], budget["ends_at"])
    assert outcome.budget_end is not None
    assert outcome.budget_end.startswith("budget of 0.02 h reached: 0 trials finished, 1 stopped at the budget; "
                                         "no trial started after"), outcome.budget_end
    assert "a new trial would need" in outcome.budget_end  # it closed on the estimate, before the end
    [parent] = runs_of(outcome.tracking_uri, "hours", role="parent")
    assert parent.info.status == "FINISHED" and parent.data.tags[TAG_ENDED_BECAUSE] == outcome.budget_end
    assert parent.data.tags[TAG_BUDGET].startswith("0.02 h, this driver from ")
    assert "stopped at the time budget after epoch" in outcome.table

    # The first driver took `setup_s` from its start to its first epoch: twice that plus two epochs is enough for
    # the resumed driver to start a trial and train it, and far too little for 100 epochs.
    setup_s = _stamps(client, first[0])[1] - budget["started"]
    hours = 2 * (setup_s + 2 * epoch_s) / 3600
    capsys.readouterr()
    assert main(["resume", "hours", "--storage", str(storage), "--hours", f"{hours:.6f}"]) == 0
    printed = capsys.readouterr().out
    resumed = json.loads((outcome.experiment_dir / BUDGET_FILE).read_text())
    assert resumed["started"] > budget["ends_at"] and math.isclose(resumed["hours"], hours, rel_tol=1e-3)
    runs = runs_of(outcome.tracking_uri, "hours")
    assert len(runs) == 2, "the resume started no trial, or more than could finish"
    [new] = [run for run in runs if run.info.run_id != first[0].info.run_id]
    _assert_stopped_at_the_end(client, new, resumed["ends_at"])
    [again] = [run for run in runs if run.info.run_id == first[0].info.run_id]
    assert _stamps(client, again) == _stamps(client, first[0]), "the first trial's points changed on resume"
    assert "0 trials finished, 2 stopped at the budget" in printed, printed
    _assert_ray_and_mlflow_agree(outcome, runs)


@pytest.mark.slow
def test_a_time_budget_ends_a_random_search_with_asha_on_time(tmp_path: Path, synth: Dataset, ray_local: None) -> None:
    # Random sampling (Tune's variant generator behind the gate) and ASHA, whose rungs (epochs 1, 3, 9, ...) let the
    # one trial at a time go on until the budget stops it: the budget, not ASHA, is named as what stopped it.
    space_file = write_space(tmp_path / "space.yaml", synth, name="hours-random",
                             budget={"epochs": 100, "trials": 3, "max_concurrent": 1, "hours": 0.015},
                             search={"algorithm": "random", "seed": 0},
                             scheduler={"type": "asha", "grace_epochs": 1, "reduction_factor": 3})
    outcome = run_search(SearchOptions(space_file=space_file, storage=tmp_path / "runs"))
    ends_at = json.loads((outcome.experiment_dir / BUDGET_FILE).read_text())["ends_at"]
    client = MlflowClient(outcome.tracking_uri)
    [run] = runs_of(outcome.tracking_uri, "hours-random")
    _assert_stopped_at_the_end(client, run, ends_at)
    assert outcome.budget_end is not None and "0 trials finished, 1 stopped at the budget" in outcome.budget_end
    assert outcome.finished == 1  # a trial the budget stopped after an epoch counts as finished (exit status 0)
    _assert_ray_and_mlflow_agree(outcome, [run])


def _stamps(client: MlflowClient, run: Any) -> list[float]:
    """The run's start, then when each epoch was recorded (its train/loss point), in seconds since the epoch."""
    points = sorted(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.step)
    return [run.info.start_time / 1000, *(m.timestamp / 1000 for m in points)]


def _assert_stopped_at_the_end(client: MlflowClient, run: Any, ends_at: float) -> float:
    """The run ended, each point once, stopped by the budget at the first epoch recorded after ``ends_at``: its last
    point at most one epoch (its longest, measured here; the first from the run's start) after the end. Returns that
    longest epoch in seconds."""
    assert run.info.status == "FINISHED"
    assert run.data.tags[TAG_STATUS] == "stopped" and run.data.tags[TAG_STOPPED_BY] == STOPPED_BY_BUDGET
    _assert_each_point_once(client, run)
    stamps = _stamps(client, run)
    epochs = len(stamps) - 1
    assert epochs >= 1 and int(run.data.tags[TAG_STOPPED_AT]) == epochs
    epoch_s = max(later - earlier for earlier, later in zip(stamps, stamps[1:], strict=False))
    assert stamps[-1] >= ends_at, "the budget stopped a trial before its end"
    assert stamps[-1] <= ends_at + epoch_s, f"trained past the end by {stamps[-1] - ends_at:.1f} s > one epoch"
    return epoch_s


def test_grid_search_tries_every_point_in_reused_trial_processes(
        tmp_path: Path, synth: Dataset, ray_local: None) -> None:
    outcome, _, runs = _search(tmp_path, synth, name="grid", budget={"epochs": 1, "trials": 1, "max_concurrent": 2},
                               search={"algorithm": "grid", "seed": 0},
                               space={"lr": {"grid": [0.01, 0.02]}, "schedule": {"choice": ["step", "cosine"]}})
    children = _children(runs)
    points = sorted((c.data.params["lr"], c.data.params["schedule"]) for c in children)
    assert points == [("0.01", "cosine"), ("0.01", "step"), ("0.02", "cosine"), ("0.02", "step")]

    # Four trials, two at a time: they ran in at most two warm processes, each trial on its own config.
    pids = {json.loads(line)["pid"] for line in _result_lines(outcome.experiment_dir)}
    assert len(pids) <= 2
    for schedule in ("step", "cosine"):  # same schedule and warm-up: the epoch's mean lr scales with lr
        ratios = [c.data.metrics["train/lr"] / float(c.data.params["lr"])
                  for c in children if c.data.params["schedule"] == schedule]
        assert math.isclose(*ratios, rel_tol=1e-6), (schedule, ratios)
    for child in children:
        log = outcome.experiment_dir / "trials" / child.data.tags[TAG_TRIAL] / "rank0" / TRIAL_LOG
        assert log.read_text().count(FIRST_ITER_MARK) == 1, "a trial's log holds its own Runner's lines only"


def _result_lines(experiment_dir: Path) -> list[str]:
    return [line for path in experiment_dir.glob("*/result.json") for line in path.read_text().splitlines() if line]


def test_random_search_samples_within_the_range(tmp_path: Path, synth: Dataset, ray_local: None) -> None:
    environment = dict(os.environ)
    _, _, runs = _search(tmp_path, synth, name="random", budget={"epochs": 1, "trials": 2, "max_concurrent": 2},
                         search={"algorithm": "random", "seed": 3})
    lrs = [float(c.data.params["lr"]) for c in _children(runs)]
    assert len(set(lrs)) == 2 and all(0.005 <= lr <= 0.03 for lr in lrs)
    assert all(c.data.tags[TAG_STATUS] == "completed" for c in _children(runs))
    # What Ray, Tune and MLflow read from the environment stays as it was for the process's next search (a
    # chain's); the libraries' own import-time settings (torch's, OpenMP's) are theirs, not the search's.
    changed = {k for k in set(os.environ) | set(environment) if os.environ.get(k) != environment.get(k)}
    assert not {k for k in changed if k.startswith(("RAY_", "TUNE_", "MLFLOW_"))}, changed


def test_tpe_with_the_same_seed_proposes_the_same_first_points(tmp_path: Path, synth: Dataset) -> None:
    space_file = write_space(tmp_path / "space.yaml", synth, fixed={"preset": "tiny"},
                             budget={"epochs": 2, "trials": 4, "max_concurrent": 4},
                             space={"lr": {"loguniform": [1.0e-4, 0.1]},
                                    "batch_size": {"choice": [2, 4]},
                                    "roi_head": {"choice": ["faster", "cascade"]}})

    def first_points(seed: int) -> list[dict[str, Any]]:
        space = load_space(space_file).model_copy(update={"search": SearchSpec(algorithm="tpe", seed=seed)})
        searcher, _, _ = make_searcher(space)
        return [searcher.suggest(f"t{i}") for i in range(4)]

    assert first_points(0) == first_points(0)
    assert first_points(0) != first_points(1)
