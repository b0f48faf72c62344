"""``dettune report`` on a real finished search: the log's table, write-up, plots and CSV, read from MLflow.

The search (two real trials on Ray, tiny Faster R-CNN, two epochs) runs once per test session and is shared with
the export, predict and leaderboard tests through :func:`finished_search`. Two more trials are logged through the
real :class:`~search.tracking.Tracker` as the driver's callback would: one ASHA stopped after its first epoch,
one that failed.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import runs_of, write_space
from mlflow.tracking import MlflowClient

from cocodata.dataset import Dataset
from results.report import add_parser, draw_plots, write_report
from results.store import open_search, open_tracking
from search.driver import SearchOptions, run_search
from search.tracking import Tracker
from spaces.errors import NotFound

NAME = "results"
HYPOTHESIS = "A larger lr learns faster in two epochs."
METHOD = "Grid over two learning rates."
FAILURE = "RuntimeError: CUDA out of memory | tried 2 GiB"
LOG_COLUMNS = ["Exp num", "Backbone", "RoI Head", "Epoch", "initial lr", "Lr schd", "Optimizer", "Inf time (fps)",
               "GFLOPs", "Params (M)",
               "val/bbox_mAP", "val/bbox_mAP_50", "val/bbox_mAP_75", "val/bbox_mAP_l", "val/bbox_mAP_m",
               "val/bbox_mAP_s", "train/loss_rpn_cls", "train/s1.loss_bbox", "train/s2.loss_cls", "train/s1.acc",
               "train/s2.acc", "train/loss"]
MAP = LOG_COLUMNS.index("val/bbox_mAP")
FIXED = {"backbone": "r18", "preset": "tiny", "scale": [160, 160], "optimizer": "sgd", "batch_size": 4,
         "schedule": "cosine"}
PNG = b"\x89PNG\r\n\x1a\n"
CARD_PLOT = "objects_per_class.png"


@dataclass(frozen=True)
class FinishedSearch:
    """A search in its own storage folder: Ray results under ``storage``, MLflow in ``tracking_uri``."""

    name: str
    storage: Path
    tracking_uri: str
    dataset_root: Path


def finished_search(tmp_path_factory: pytest.TempPathFactory, dataset: Dataset) -> FinishedSearch:
    """Runs the shared search on first use in this test session; later calls find it on disk."""
    root = tmp_path_factory.getbasetemp() / "results-search"
    marker = root / "search.json"
    if not marker.is_file():
        root.mkdir(parents=True, exist_ok=True)
        space = write_space(root / "space.yaml", dataset, name=NAME, metric="val/bbox_mAP", hypothesis=HYPOTHESIS,
                            method=METHOD, search={"algorithm": "grid", "seed": 0}, fixed=FIXED,
                            space={"lr": {"choice": [0.02, 0.01]}})
        outcome = run_search(SearchOptions(space_file=space, storage=root / "runs"))
        _log_stopped_and_failed(outcome.tracking_uri)
        marker.write_text(json.dumps({"tracking_uri": outcome.tracking_uri}))
    return FinishedSearch(name=NAME, storage=root / "runs", dataset_root=dataset.root,
                          tracking_uri=json.loads(marker.read_text())["tracking_uri"])


def _log_stopped_and_failed(tracking_uri: str) -> None:
    tracker = Tracker(tracking_uri, NAME)
    params = {**FIXED, "epochs": 2, "lr": 0.01}
    tracker.start_trial("stopped0", params)
    tracker.log_epoch("stopped0", {"epoch": 1, "val/bbox_mAP": 0.0004, "val/bbox_mAP_50": 0.002,
                                   "train/loss": 2.5, "train/loss_rpn_cls": 0.69})
    tracker.end_trial("stopped0", status="stopped", stopped_at=1)
    tracker.start_trial("failed00", params)
    tracker.end_trial("failed00", status="failed", failure=FAILURE)


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, synth_large: Dataset, ray_local: None) -> FinishedSearch:
    return finished_search(tmp_path_factory, synth_large)


@pytest.fixture(scope="module")
def report(finished: FinishedSearch, tmp_path_factory: pytest.TempPathFactory) -> Path:
    search = open_search(open_tracking(finished.tracking_uri), finished.name)
    return write_report(search, tmp_path_factory.mktemp("report"))


def trial_runs(tracking_uri: str) -> dict[str, Any]:
    """Exp num -> MLflow run, read straight from MLflow."""
    return {r.data.tags["dettune.exp_num"]: r for r in runs_of(tracking_uri, NAME)}


def raw_best(tracking_uri: str, run_id: str, key: str = "val/bbox_mAP") -> tuple[int, float] | None:
    """(epoch, value) of the run's highest ``key`` from MLflow's raw history, the earliest epoch among equals."""
    best: tuple[int, float] | None = None
    for point in sorted(MlflowClient(tracking_uri).get_metric_history(run_id, key), key=lambda m: m.step):
        if best is None or point.value > best[1]:
            best = (point.step, point.value)
    return best


def raw_value(tracking_uri: str, run_id: str, key: str, epoch: int) -> float:
    (value,) = [m.value for m in MlflowClient(tracking_uri).get_metric_history(run_id, key) if m.step == epoch]
    return value


def _table(markdown: str) -> list[list[str]]:
    """The trial table's header and rows as cells."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| Exp num | Backbone"))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]])
    return [rows[0], *rows[2:]]


@pytest.mark.slow
def test_table_has_the_logs_columns_and_one_row_per_trial(finished: FinishedSearch, report: Path) -> None:
    header, *rows = _table(report.read_text())
    client = MlflowClient(finished.tracking_uri)
    runs = {r.data.tags["dettune.exp_num"]: r for r in client.search_runs(
        [client.get_experiment_by_name(NAME).experiment_id], "tags.`dettune.role` = 'trial'")}

    assert header == LOG_COLUMNS
    assert sorted(row[0] for row in rows) == sorted(runs) == [f"{NAME}-{i}" for i in range(1, 5)]
    assert all(len(row) == len(LOG_COLUMNS) for row in rows)
    maps = [float(row[MAP]) if row[MAP] != "-" else -1.0 for row in rows]
    assert maps == sorted(maps, reverse=True), "rows must be sorted by val/bbox_mAP"
    for row in rows:
        run = runs[row[0]]
        assert row[1:3] == ["r18", "faster"] and row[5:7] == ["cosine", "sgd"]
        assert row[4] == f"{float(run.data.params['lr']):.3e}"
        for cell in row[MAP:MAP + 6]:
            assert cell == "-" or re.fullmatch(r"\d+\.\d", cell), cell


@pytest.mark.slow
def test_scores_come_from_each_trials_best_epoch(finished: FinishedSearch, report: Path) -> None:
    runs = trial_runs(finished.tracking_uri)
    for row in _table(report.read_text())[1:]:
        run_id = runs[row[0]].info.run_id
        best = raw_best(finished.tracking_uri, run_id)
        if best is None:  # the failed trial
            assert row[MAP] == row[LOG_COLUMNS.index("train/loss")] == "-"
            continue
        epoch, value = best
        assert row[MAP] == f"{100 * value:.1f}"  # the log's percent, one decimal
        loss = raw_value(finished.tracking_uri, run_id, "train/loss", epoch)
        assert row[LOG_COLUMNS.index("train/loss")] == f"{loss:.3f}"


@pytest.mark.slow
def test_completed_stopped_and_failed_trials_are_marked(report: Path) -> None:
    text = report.read_text()
    rows = {row[0]: row for row in _table(text)[1:]}
    completed = [rows[f"{NAME}-{i}"] for i in (1, 2)]
    stopped, failed = rows[f"{NAME}-3"], rows[f"{NAME}-4"]

    for row in completed:
        assert row[3] == "2" and float(row[7]) > 0, "a completed trial shows its epochs and inference fps"
        assert float(row[8]) > 0 and float(row[9]) > 0, "and its GFLOPs and parameters"
        assert row[17:21] == ["-"] * 4, "Faster R-CNN has no cascade stages"
    assert stopped[3] == "1/2 (stopped by ASHA)" and stopped[7:10] == ["-"] * 3 and stopped[10] == "0.0"
    assert failed[3] == "0/2 (failed)" and failed[7:] == ["-"] * 15
    assert list(rows)[-1] == f"{NAME}-4", "a trial without a score comes last"
    assert f"- {NAME}-4: {FAILURE}" in text


@pytest.mark.slow
def test_fps_is_logged_after_the_first_and_the_last_epoch_and_model_costs_once(finished: FinishedSearch) -> None:
    client = MlflowClient(finished.tracking_uri)
    for run in client.search_runs([client.get_experiment_by_name(NAME).experiment_id],
                                  "tags.`dettune.status` = 'completed'"):
        history = client.get_metric_history(run.info.run_id, "inference/fps")
        assert [m.step for m in history] == [1, 2] and all(m.value > 0 for m in history)
        for cost in ("model/gflops", "model/params_M"):
            points = client.get_metric_history(run.info.run_id, cost)
            assert [m.step for m in points] == [1] and points[0].value > 0


@pytest.mark.slow
def test_writeup_has_the_spaces_hypothesis_method_and_knob_effects(finished: FinishedSearch, report: Path) -> None:
    text = report.read_text()
    scores: dict[str, list[float]] = {}
    for run in trial_runs(finished.tracking_uri).values():
        if (best := raw_best(finished.tracking_uri, run.info.run_id)) is not None:
            scores.setdefault(run.data.params["lr"], []).append(100 * best[1])

    assert f"- 실험 가설 (hypothesis) : {HYPOTHESIS}" in text
    assert f"- 실험 방법 (method) : {METHOD}" in text
    best, mean = max(scores["0.01"]), sum(scores["0.01"]) / len(scores["0.01"])
    assert f"0.01 best {best:.1f}, mean {mean:.1f} (n={len(scores['0.01'])})" in text
    assert "lr: 0.02 best" in text and "0.01 best" in text
    assert "## Leader board" in text


@pytest.mark.slow
def test_plots_are_pngs_linked_from_the_report_and_logged(finished: FinishedSearch, report: Path,
                                                          tmp_path: Path) -> None:
    search = open_search(open_tracking(finished.tracking_uri), finished.name)
    trials = search.trials()
    plots = {p.path.name: p for p in draw_plots(search, trials, tmp_path)}

    assert set(plots) == {"epochs.png", "best_so_far.png", "knob_lr.png"}
    assert plots["epochs.png"].lines == 3, "one line per trial that reported (the failed one did not)"
    assert plots["best_so_far.png"].lines == 1
    assert plots["knob_lr.png"].bars == 2, "one bar per lr value"
    for plot in plots.values():
        assert plot.path.read_bytes().startswith(PNG)
        assert (report.parent / "plots" / plot.path.name).read_bytes().startswith(PNG)
        assert f"](plots/{plot.path.name})" in report.read_text()
    logged = search.client.list_artifacts(search.parent.info.run_id, "report/plots")
    assert {Path(a.path).name for a in logged} == {*plots, CARD_PLOT}


@pytest.mark.slow
def test_the_dataset_card_is_a_table_and_a_plot(finished: FinishedSearch, report: Path) -> None:
    text = report.read_text()
    docs = [json.loads((finished.dataset_root / name).read_text()) for name in ("train.json", "val.json")]
    section = text[text.index("## Dataset"):text.index("## Leader board")]
    rows = {cells[0]: cells[1:] for line in section.splitlines() if line.startswith("| ")
            for cells in [[c.strip() for c in line.strip("|").split("|")]]}
    assert rows[""] == ["train.json", "val.json"]
    assert rows["images"] == [str(len(doc["images"])) for doc in docs]
    assert rows["objects"] == [str(len(doc["annotations"])) for doc in docs]
    for category in docs[0]["categories"]:
        assert rows[f"class {category['name']}"] == [
            str(sum(a["category_id"] == category["id"] for a in doc["annotations"])) for doc in docs]
    assert (report.parent / "plots" / CARD_PLOT).read_bytes().startswith(PNG)
    assert f"](plots/{CARD_PLOT})" in section


@pytest.mark.slow
def test_csv_has_the_same_rows_and_how_each_trial_ended(finished: FinishedSearch, tmp_path: Path) -> None:
    search = open_search(open_tracking(finished.tracking_uri), finished.name)
    path = write_report(search, tmp_path, fmt="csv")
    header, *rows = list(csv.reader(path.open()))

    runs = trial_runs(finished.tracking_uri)
    oldest_first = sorted(runs, key=lambda num: runs[num].info.start_time)
    best = {num: raw_best(finished.tracking_uri, runs[num].info.run_id) for num in oldest_first}
    scored = sorted((num for num in best if best[num] is not None), key=lambda num: -best[num][1])  # type: ignore[index]

    assert path.name == "report.csv" and header == [*LOG_COLUMNS, "Status"]
    assert [row[0] for row in rows] == [*scored, *(num for num in best if best[num] is None)]
    statuses = {row[0]: row[-1] for row in rows}
    assert statuses[f"{NAME}-3"] == "stopped by ASHA at epoch 1"
    assert statuses[f"{NAME}-4"] == f"failed: {FAILURE}"


@pytest.mark.slow
def test_unknown_search_is_a_user_error_naming_the_known_ones(finished: FinishedSearch) -> None:
    with pytest.raises(NotFound, match=rf"no search named 'nope' .*it has: {NAME}"):
        open_search(open_tracking(finished.tracking_uri), "nope")


def test_missing_default_store_is_a_user_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    monkeypatch.chdir(tmp_path)
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["report", "demo"])
    with pytest.raises(NotFound, match="no MLflow store at .*runs/mlflow.db"):
        args.handler(args)
    assert not (tmp_path / "runs").exists()
