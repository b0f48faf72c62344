"""Accuracy against cost on a real search: the costs every trial reports, the Pareto front in the report and in
MLflow, and export within limits.

One search runs per module (Ray in-process, tiny Faster R-CNN, ResNet-18 at 96 or 192 px: a real GFLOPs and FPS
trade-off), TPE over three objectives with ASHA pruning on the primary metric. Every expectation is computed here
from MLflow's raw metric histories, not from dettune's read-back code.
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import pytest
from conftest import runs_of, write_space
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from results.report import draw_pareto, open_search, open_tracking, write_report
from search.cli import main
from search.driver import SAVED_SPACE, SearchOptions, SearchOutcome, run_search
from search.optuna_search import TRIAL_ATTR, ObjectiveSearch
from search.tracking import TAG_EXP_NUM, TAG_FRONT, TAG_PARETO, TAG_STATUS, TAG_TRIAL, Tracker
from spaces.dataset import Dataset
from spaces.schema import Space, load_space

NAME = "pareto"
PRIMARY = "val/bbox_mAP_50"
OBJECTIVES = [("inference/fps", "max"), ("model/gflops", "min")]
COSTS = ("inference/fps", "model/gflops", "model/params_M")


@pytest.fixture(scope="module")
def searched(tmp_path_factory: pytest.TempPathFactory, synth: Dataset, ray_local: None) -> SearchOutcome:
    root = tmp_path_factory.mktemp("pareto")
    space = write_space(root / "space.yaml", synth, name=NAME, metric=PRIMARY,
                        objectives=[{"metric": m, "mode": mode} for m, mode in OBJECTIVES],
                        budget={"epochs": 2, "trials": 4, "max_concurrent": 2},
                        scheduler={"type": "asha", "grace_epochs": 1, "reduction_factor": 2},
                        space={"scale": {"choice": [[96, 96], [192, 192]]}, "lr": {"loguniform": [0.005, 0.03]}},
                        fixed={"backbone": "r18", "preset": "tiny", "optimizer": "sgd", "batch_size": 4})
    return run_search(SearchOptions(space_file=space, storage=root / "runs"))


def _history(client: MlflowClient, run: Run, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))


def _values(outcome: SearchOutcome) -> dict[str, list[float]]:
    """Per finished trial: the best primary over its epochs, and each other objective's last measurement."""
    client = MlflowClient(outcome.tracking_uri)
    out = {}
    for run in runs_of(outcome.tracking_uri, NAME):
        if run.data.tags[TAG_STATUS] in ("completed", "stopped"):
            primary = max(v for _, v in _history(client, run, PRIMARY))
            out[run.data.tags[TAG_EXP_NUM]] = [primary, *(_history(client, run, m)[-1][1] for m, _ in OBJECTIVES)]
    return out


def _non_dominated(values: dict[str, list[float]]) -> set[str]:
    signs = [1.0, *(1.0 if mode == "max" else -1.0 for _, mode in OBJECTIVES)]

    def beats(p: list[float], q: list[float]) -> bool:
        return (all(s * a >= s * b for s, a, b in zip(signs, p, q, strict=True))
                and any(s * a > s * b for s, a, b in zip(signs, p, q, strict=True)))

    return {name for name, q in values.items() if not any(beats(p, q) for p in values.values())}


@pytest.mark.slow
def test_every_trial_has_its_costs_from_the_first_epoch(searched: SearchOutcome) -> None:
    client = MlflowClient(searched.tracking_uri)
    children = runs_of(searched.tracking_uri, NAME)
    assert len(children) == 4
    for run in children:
        for key in COSTS:
            steps = [step for step, _ in _history(client, run, key)]
            assert steps and steps[0] == 1, (run.data.tags[TAG_EXP_NUM], key, steps)
        assert run.data.params["inference.batch_size"] == "1"
        assert run.data.params["inference.device"] == "cpu"
    gflops = {run.data.params["scale"]: run.data.metrics["model/gflops"] for run in children}
    if len(gflops) == 2:  # both scales were tried: the larger input costs more
        assert gflops["192x192"] > gflops["96x96"]


@pytest.mark.slow
def test_reports_front_is_the_non_dominated_set_and_mlflow_tags_it(searched: SearchOutcome, tmp_path: Path) -> None:
    expected = _non_dominated(_values(searched))
    report = write_report(open_search(open_tracking(searched.tracking_uri), NAME), tmp_path).read_text()

    section = report[report.index("## Pareto front"):]
    front = {line.split("|")[1].strip() for line in section.splitlines()[4:] if re.match(r"\| pareto-\d+ ", line)}
    assert front == expected
    assert sorted(p.name for p in (tmp_path / "plots").glob("pareto_*.png")) == [
        "pareto_inference_fps.png", "pareto_model_gflops.png"]
    assert "| GFLOPs | Params (M) |" in report

    client = MlflowClient(searched.tracking_uri)
    trials = runs_of(searched.tracking_uri, NAME)
    tagged = {r.data.tags[TAG_EXP_NUM] for r in trials if r.data.tags.get(TAG_PARETO) == "true"}
    parent = client.get_run(trials[0].data.tags["mlflow.parentRunId"])
    assert tagged == expected
    assert set(parent.data.tags[TAG_FRONT].split(", ")) == expected


@pytest.mark.slow
def test_end_of_search_table_shows_each_objective_and_marks_the_front(searched: SearchOutcome) -> None:
    lines = searched.table.splitlines()
    starts = [m.start() for m in re.finditer(r"\S+", lines[0])]
    rows = [[line[a:b].strip() for a, b in itertools.pairwise([*starts, None])] for line in lines]
    header, body = rows[0], {row[0]: dict(zip(rows[0], row, strict=True)) for row in rows[1:]}
    expected_front = _non_dominated(_values(searched))
    runs = {r.data.tags[TAG_EXP_NUM]: r for r in runs_of(searched.tracking_uri, NAME)}

    assert header[header.index(PRIMARY):] == [PRIMARY, *(m for m, _ in OBJECTIVES), "pareto", "status"]
    assert {num for num, row in body.items() if row["pareto"] == "*"} == expected_front
    for num, row in body.items():
        for metric, _ in OBJECTIVES:  # as last measured
            assert row[metric] == f"{runs[num].data.metrics[metric]:.3g}", (num, metric)


@pytest.mark.slow
def test_export_with_min_fps_picks_the_best_trial_that_meets_it(searched: SearchOutcome, tmp_path: Path) -> None:
    values = _values(searched)
    fps = sorted(v[1] for v in values.values())
    limit = (fps[0] + fps[-1]) / 2  # some trials meet it, some don't
    feasible = {name: v for name, v in values.items() if v[1] >= limit}
    expected = max(feasible, key=lambda name: feasible[name][0])
    best_without = max(values, key=lambda name: values[name][0])

    code = main(["export", NAME, "--out", str(tmp_path / "model"), "--min-fps", str(limit),
                 "--tracking-uri", searched.tracking_uri])
    info = json.loads((tmp_path / "model" / "metrics.json").read_text())

    assert code == 0
    assert info["exp_num"] == expected
    assert info["limits"] == {"inference/fps": f">= {limit:g}"}
    assert info["traded"]["exported"][PRIMARY] == feasible[expected][0]
    assert info["traded"]["exported"]["inference/fps"] >= limit
    assert info["traded"]["best_without_limits"][PRIMARY] == values[best_without][0]


@pytest.mark.slow
def test_a_limit_no_trial_meets_is_exit_2_naming_the_closest(searched: SearchOutcome, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "model"
    code = main(["export", NAME, "--out", str(out), "--min-fps", "100000", "--tracking-uri", searched.tracking_uri])
    error = capsys.readouterr().err

    assert code == 2
    assert "no trial of pareto meets inference/fps >= 100000 (closest: pareto-" in error
    assert "relax the limits" in error and "Traceback" not in error
    assert not out.exists()


@pytest.mark.slow
def test_the_searchers_study_holds_each_finished_trials_point_and_values_as_mlflow_does(
        searched: SearchOutcome) -> None:
    space = load_space(searched.experiment_dir / SAVED_SPACE)
    searcher = ObjectiveSearch(space)
    searcher.restore_from_dir(str(searched.experiment_dir))  # the state Tune saved with the experiment
    values = _values(searched)
    runs = {run.data.tags[TAG_TRIAL]: run for run in runs_of(searched.tracking_uri, NAME)}

    told = {t.user_attrs[TRIAL_ATTR]: t for t in searcher.study.trials if t.state == TrialState.COMPLETE}
    assert {runs[trial_id].data.tags[TAG_EXP_NUM] for trial_id in told} == set(values)
    for trial_id, trial in told.items():
        run = runs[trial_id]
        assert trial.values == values[run.data.tags[TAG_EXP_NUM]]
        scale = "x".join(str(side) for side in json.loads(trial.params["scale"]))
        assert (trial.params["lr"], scale) == (float(run.data.params["lr"]), run.data.params["scale"])


# Logged by hand as the driver's callback would: (status, per-epoch mAP, per-epoch FPS (None: not measured)).
# Values per trial: best mAP and last FPS. Limit FPS >= 5. By hand: t3 (0.55, 3) is outside the limit; t4
# (0.15, 20) is beaten by t1 (0.20, 28); t6 failed. The front is t1 (0.20, 28), t5 (0.25, 15), t2 (0.35, 11).
HAND_LOGGED = {
    "t1": ("completed", [0.10, 0.20], [30.0, 28.0]),
    "t2": ("completed", [0.30, 0.35], [12.0, 11.0]),
    "t3": ("completed", [0.50, 0.55], [4.0, 3.0]),
    "t4": ("stopped", [0.15], [20.0]),
    "t5": ("stopped", [0.25], [15.0]),
    "t6": ("failed", [], []),
}


def test_report_lists_the_front_within_the_limits(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    space = Space.from_json({
        "name": "hand", "base": "mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py",
        "data": {"root": "data", "train": "train.json", "val": "val.json"}, "metric": "val/bbox_mAP",
        "objectives": [{"metric": "inference/fps", "mode": "max"}], "constraints": {"inference/fps": {"min": 5}},
        "budget": {"epochs": 2, "trials": 6}, "space": {"lr": {"loguniform": [0.001, 0.1]}}})
    tracker = Tracker(uri, "hand", artifact_root=tmp_path / "artifacts")
    tracker.describe_search(tags={}, space_yaml="", space_json=json.dumps(space.to_json()))
    for trial_id, (status, maps, fps) in HAND_LOGGED.items():
        tracker.start_trial(trial_id, {"lr": 0.01})
        for epoch, (value, speed) in enumerate(zip(maps, fps, strict=True), start=1):
            tracker.log_epoch(trial_id, {"epoch": epoch, "val/bbox_mAP": value, "inference/fps": speed})
        tracker.end_trial(trial_id, status=status, stopped_at=1 if status == "stopped" else None)
    search = open_search(open_tracking(uri), "hand")

    report = write_report(search, tmp_path / "report").read_text()
    plots = draw_pareto(space, search.trials(), tmp_path / "plots")

    section = report[report.index("## Pareto front"):report.index("### Plots")]
    rows = [line.split("|")[1].strip() for line in section.splitlines() if line.startswith("| hand-")]
    assert rows == ["hand-1", "hand-2", "hand-5"]
    assert "Limits: inference/fps >= 5; 4 of 5 finished trials meet them." in section
    assert "best within the limits hand-2: val/bbox_mAP 35.0" in report
    assert [(p.path.name, p.lines) for p in plots] == [("pareto_inference_fps.png", 2)]  # the front and the limit
