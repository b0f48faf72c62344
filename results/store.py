"""A search read back from MLflow: the one way report, export and lb find searches, trials and their metrics.

:func:`open_tracking` opens the store a search wrote, :func:`open_search` finds the search in it (its parent run
and the space it searched) and :meth:`SearchHandle.trials` reads every trial back as a :class:`TrialRecord`:
its tags, params and each metric's full history, the way Ray Tune's ``ResultGrid`` hands results to user code.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow.artifacts
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from cocodata.datacheck import CARD_FILE, DatasetCard
from spaces.errors import NotFound
from spaces.schema import NAME_PATTERN, Space
from tracking_names import (
    DEFAULT_STORAGE,
    ROLE_ENSEMBLE,
    TAG_EXP_NUM,
    TAG_FAILURE,
    TAG_ROLE,
    TAG_SEARCH,
    TAG_STATUS,
    TAG_STOPPED_AT,
    TAG_STOPPED_BY,
    TAG_TRIAL,
    check_reachable,
    find_runs,
    local_tracking_uri,
    outcome_text,
    use_credentials,
    without_credentials,
)

LB_METRIC = "lb/public_mAP"
"""A public leaderboard score, in percent (0..100) as the leaderboard shows it; see :mod:`results.leaderboard`."""
TAG_LB_NOTE = "dettune.lb_note"

RUN_ID = re.compile(r"^[0-9a-f]{32}$")
EXP_NUM = re.compile(r"^(?P<search>[A-Za-z0-9][A-Za-z0-9_.-]*)-(?P<n>[0-9]+)$")
_EPOCH_PREFIXES = ("val/", "train/")
_REF_HELP = "give the trial's MLflow run id or its Exp num from `dettune report` (e.g. demo-4)"


def add_tracking_flag(parser: argparse.ArgumentParser) -> None:
    """Adds ``--tracking-uri`` with the search's default."""
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: the SQLite store `dettune search` "
                                               f"writes under ./{DEFAULT_STORAGE})")


def open_tracking(uri: str | None) -> MlflowClient:
    """A client for ``uri`` (default: the search's local SQLite store); credentials in it go to MLflow's variables.

    Raises:
        NotFound: The SQLite file does not exist (MLflow would create an empty store there).
        TrackingUnreachable: A tracking server that does not answer.
    """
    uri = use_credentials(uri) if uri else local_tracking_uri(DEFAULT_STORAGE)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise NotFound(f"no MLflow store at {uri}: run this where `dettune search` ran (it writes "
                       f"{DEFAULT_STORAGE}/mlflow.db), or pass the search's --tracking-uri")
    check_reachable(uri)
    return MlflowClient(uri)


@dataclass(frozen=True)
class Point:
    """One logged value: the step is the epoch (for ``lb/`` the submission count)."""

    step: int
    value: float
    timestamp_ms: int


@dataclass(frozen=True, kw_only=True)
class TrialRecord:
    """One trial run as MLflow holds it: tags, params (strings) and every metric's history."""

    run_id: str
    exp_num: str
    trial_id: str
    status: str
    stopped_at: int | None
    failure: str | None
    lb_note: str | None
    params: dict[str, str]
    stopped_by: str | None = None
    """``budget`` for a trial the time budget stopped; otherwise ASHA stopped a ``stopped`` trial."""
    history: dict[str, list[Point]]

    @property
    def epochs(self) -> int:
        """The last epoch the trial reported."""
        return max((p.step for k, points in self.history.items() if k.startswith(_EPOCH_PREFIXES)
                    for p in points), default=0)

    @property
    def outcome(self) -> str:
        """How the trial ended, as a sentence (``stopped by ASHA at epoch 1``)."""
        return outcome_text(self.status, stopped_at=self.stopped_at or self.epochs, failure=self.failure,
                            stopped_by=self.stopped_by)

    def best_epoch(self, metric: str, mode: str) -> int | None:
        """The first epoch with the trial's best ``metric``, or None before any."""
        points = self.history.get(metric, ())
        if not points:
            return None
        pick = max if mode == "max" else min
        return pick(points, key=lambda p: p.value).step

    def at(self, epoch: int | None) -> dict[str, float]:
        """Every metric logged at ``epoch``."""
        return {key: p.value for key, points in self.history.items() for p in points if p.step == epoch}

    def score(self, metric: str, mode: str) -> float | None:
        """The trial's best ``metric``."""
        return self.at(self.best_epoch(metric, mode)).get(metric)

    def latest(self, key: str) -> float | None:
        """The last value of ``key`` (e.g. ``inference/fps``, measured after the last epoch only)."""
        points = self.history.get(key, ())
        return points[-1].value if points else None


@dataclass(frozen=True, kw_only=True)
class SearchHandle:
    """A search in MLflow: its experiment, its parent run and the space it searched."""

    client: MlflowClient
    name: str
    experiment_id: str
    parent: Run
    space: Space

    def runs(self, **tags: str) -> list[Run]:
        """This search's trial runs with the given tag values, oldest first."""
        return find_runs(self.client, self.experiment_id, {TAG_SEARCH: self.name, TAG_ROLE: "trial", **tags})

    def ensembles(self) -> list[Run]:
        """This search's ``dettune ensemble`` runs, oldest first."""
        return find_runs(self.client, self.experiment_id, {TAG_SEARCH: self.name, TAG_ROLE: ROLE_ENSEMBLE})

    def trials(self) -> list[TrialRecord]:
        """Every trial of the search with its full metric histories, oldest first."""
        return [trial_record(self.client, run) for run in self.runs()]

    def dataset_card(self) -> DatasetCard | None:
        """The card of the data the trials read, as the search logged it (None for a search from before cards)."""
        if CARD_FILE not in {a.path for a in self.client.list_artifacts(self.parent.info.run_id)}:
            return None
        text = mlflow.artifacts.load_text(f"{self.parent.info.artifact_uri}/{CARD_FILE}")
        return DatasetCard.from_json(json.loads(text))

    def run_of(self, trial_id: str) -> Run:
        """The MLflow run of Ray trial ``trial_id``.

        Raises:
            NotFound: No run of this search has that trial id.
        """
        runs = self.runs(**{TAG_TRIAL: trial_id})
        if not runs:
            raise NotFound(f"trial {trial_id} of search {self.name} has no MLflow run: was the search moved to "
                           "another tracking store? Pass its --tracking-uri")
        return runs[0]


def open_search(client: MlflowClient, name: str) -> SearchHandle:
    """Finds the search ``name`` and reloads its space from the parent run's ``space.json``.

    Raises:
        NotFound: No such search in this store; the message lists the searches it has.
    """
    experiment = client.get_experiment_by_name(name) if NAME_PATTERN.match(name) else None
    parents = [] if experiment is None else find_runs(
        client, experiment.experiment_id, {TAG_ROLE: "parent", TAG_SEARCH: name}, max_results=1)
    if experiment is None or not parents:
        known = sorted(e.name for e in client.search_experiments() if e.name != "Default")
        raise NotFound(f"no search named {name!r} in {_store(client)} (it has: {', '.join(known) or 'none'}): "
                       "check the name, or pass the --tracking-uri the search used")
    parent = parents[0]
    text = mlflow.artifacts.load_text(f"{parent.info.artifact_uri}/space.json")
    return SearchHandle(client=client, name=name, experiment_id=experiment.experiment_id, parent=parent,
                        space=Space.from_json(json.loads(text), f"{name}: space.json"))


def trial_record(client: MlflowClient, run: Run) -> TrialRecord:
    """Reads one trial run back, with every metric's history sorted by step."""
    tags = run.data.tags
    history = {key: sorted((Point(int(m.step), float(m.value), int(m.timestamp))
                            for m in client.get_metric_history(run.info.run_id, key)),
                           key=lambda p: (p.step, p.timestamp_ms))
               for key in run.data.metrics}
    stopped_at = tags.get(TAG_STOPPED_AT)
    return TrialRecord(run_id=run.info.run_id, exp_num=tags.get(TAG_EXP_NUM, run.info.run_id),
                       trial_id=tags.get(TAG_TRIAL, ""), status=tags.get(TAG_STATUS, "running"),
                       stopped_at=int(stopped_at) if stopped_at else None, failure=tags.get(TAG_FAILURE),
                       lb_note=tags.get(TAG_LB_NOTE), params=dict(run.data.params), history=history,
                       stopped_by=tags.get(TAG_STOPPED_BY))


def find_trial_run(client: MlflowClient, ref: str) -> Run:
    """The run named by ``ref``: an MLflow run id, or a trial's Exp num ``<search>-<n>``.

    Raises:
        NotFound: ``ref`` is neither, or names no run in this store.
    """
    if RUN_ID.match(ref):
        try:
            return client.get_run(ref)
        except MlflowException:
            raise NotFound(f"no run with id {ref} in {_store(client)}: {_REF_HELP}, or pass the "
                           "search's --tracking-uri") from None
    match = EXP_NUM.match(ref)
    if match is None:
        raise NotFound(f"{ref!r} is not a run id or an Exp num: {_REF_HELP}")
    experiment = client.get_experiment_by_name(match["search"])
    runs = [] if experiment is None else find_runs(client, experiment.experiment_id, {TAG_EXP_NUM: ref},
                                                   max_results=1)
    if not runs:
        raise NotFound(f"no trial {ref} in {_store(client)}: {_REF_HELP}, or pass the search's --tracking-uri")
    return runs[0]


def _store(client: Any) -> str:
    """The store's URI for a message, without credentials."""
    return without_credentials(str(client.tracking_uri))
