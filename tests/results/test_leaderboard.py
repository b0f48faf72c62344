"""``dettune lb``: a public leaderboard score recorded on a trial's run, shown by MLflow and the report."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from test_report import FinishedSearch, finished_search

from cocodata.dataset import Dataset
from results.leaderboard import add_parser, record_score
from results.report import write_report
from results.store import LB_METRIC, TAG_LB_NOTE, find_trial_run, open_search, open_tracking
from spaces.errors import BadArgument, NotFound


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, synth_large: Dataset, ray_local: None) -> FinishedSearch:
    return finished_search(tmp_path_factory, synth_large)


def _lb(finished: FinishedSearch, *argv: str) -> int:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["lb", *argv, "--tracking-uri", finished.tracking_uri])
    return int(args.handler(args))


@pytest.mark.slow
def test_score_lands_in_mlflow_and_in_the_reports_table(finished: FinishedSearch, tmp_path: Path) -> None:
    client = MlflowClient(finished.tracking_uri)
    assert _lb(finished, f"{finished.name}-2", "--map", "54.5", "--note", "tta | fold 1") == 0
    run = find_trial_run(client, f"{finished.name}-2")
    assert _lb(finished, run.info.run_id, "--map", "55.1") == 0

    history = client.get_metric_history(run.info.run_id, LB_METRIC)
    assert [(m.step, m.value) for m in history] == [(0, 54.5), (1, 55.1)]
    assert client.get_run(run.info.run_id).data.tags[TAG_LB_NOTE] == "tta | fold 1"

    report = write_report(open_search(open_tracking(finished.tracking_uri), finished.name), tmp_path)
    text = report.read_text()
    board = text[text.index("## Leader board"):].splitlines()
    assert board[1:4] == ["| Exp num | Public LB map | Note |", "|:---:|:---:|:---:|",
                          f"| {finished.name}-2 | 55.1 | tta \\| fold 1 |"]


@pytest.mark.slow
def test_wrong_run_or_score_is_a_user_error(finished: FinishedSearch) -> None:
    client = MlflowClient(finished.tracking_uri)
    with pytest.raises(NotFound, match=f"no trial {finished.name}-99 in"):
        find_trial_run(client, f"{finished.name}-99")
    with pytest.raises(NotFound, match="no run with id 0{32}"):
        find_trial_run(client, "0" * 32)
    with pytest.raises(NotFound, match="not a run id or an Exp num"):
        find_trial_run(client, "it's mine")
    with pytest.raises(BadArgument, match="must be the leaderboard's mAP in percent, 0..100"):
        record_score(client, find_trial_run(client, f"{finished.name}-1"), 545.0)
