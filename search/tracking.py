"""MLflow bookkeeping: one parent run per search, exactly one nested run per trial, each point once.

The trial -> run mapping is durable: every run carries tags (``dettune.search``, ``dettune.trial_id``), and a
run is looked up by them before one is created. After ``dettune resume`` or a retried trial the same run
continues. Which epochs a run already holds is read back from MLflow, so a point is never written twice.

Two drivers may write the same search to one store: the experiment's unique name decides which one creates the
parent run, and each trial number (``<search>-<n>``) is claimed as a parent param, which MLflow never changes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, Run, RunTag
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, RESOURCE_ALREADY_EXISTS, ErrorCode
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from search.local_store import ensure_store
from search.rung import RUNG_SCORE
from spaces.errors import DamagedFile
from spaces.knobs import param_text
from spaces.objectives import COST_METRICS
from tracking_names import (
    DEFAULT_TRACKING_TIMEOUT_S,
    EXP_NUM_CLAIM,
    EXPERIMENT_TAGS,
    LOCAL_STORE,
    LOG_METRICS,
    RUNS_VIEW,
    SHARED_VIEW_TAG,
    TAG_BEST_EPOCH,
    TAG_BEST_KNOB,
    TAG_BEST_TRIAL,
    TAG_EXP_NUM,
    TAG_FAILURE,
    TAG_FRONT,
    TAG_PARETO,
    TAG_ROLE,
    TAG_SEARCH,
    TAG_STATUS,
    TAG_STOPPED_AT,
    TAG_STOPPED_BY,
    TAG_TRIAL,
    find_runs,
    is_log_column,
    local_study_uri,
    local_tracking_uri,
    run_filter,
    without_credentials,
)
from tracking_names.storage import Storage


def is_tracked(key: str) -> bool:
    """Whether a result key is written to the trial's run: the log's columns, and the score ASHA ranked it by."""
    return is_log_column(key) or key == RUNG_SCORE


@dataclass(frozen=True, kw_only=True)
class TrackingSettings:
    """Where a search's MLflow writes go and how long an outage may last, saved beside its Ray results.

    A resumed search reads them back, with any of them changed on its command line; the driver's callbacks
    rebuild their :class:`Tracker` from them, so a new ``--tracking-uri`` reaches them too.
    """

    uri: str | None = None
    """Without credentials; None is the SQLite store beside the Ray storage."""
    down_timeout_s: float = DEFAULT_TRACKING_TIMEOUT_S
    study_uri: str | None = None
    """The Optuna storage of the study copy, without credentials; None is ``optuna.db`` beside the Ray storage."""

    def effective_uri(self, storage: Path | Storage) -> str:
        """The tracking URI; the local default only for a local ``storage`` (the driver refuses a URI without one)."""
        return self.uri or local_tracking_uri(Storage.of(storage).local_path)

    def effective_study_uri(self, storage: Path | Storage) -> str:
        return self.study_uri or local_study_uri(Storage.of(storage).local_path)

    def tracker(self, storage: Path | Storage, search: str, *, fresh: bool = False) -> Tracker:
        """The search's tracker; the local default keeps artifacts under ``storage/mlartifacts``."""
        if self.uri is None:
            local = Storage.of(storage).local_path
            ensure_store(local / LOCAL_STORE)
        return Tracker(self.effective_uri(storage), search, fresh=fresh,
                       artifact_root=None if self.uri else local / "mlartifacts")

    def save(self, path: Path | Storage) -> None:
        Storage.of(path).write_text(json.dumps(asdict(self)))

    @classmethod
    def load(cls, path: Path | Storage) -> TrackingSettings:
        """Reads what :meth:`save` wrote.

        Raises:
            DamagedFile: The file is not the JSON object of these settings (edited by hand, cut short).
        """
        try:
            text = Storage.of(path).read_text()
            if text is None:
                raise FileNotFoundError(f"no search settings at {path}")
            settings = cls(**json.loads(text))
            if (isinstance(settings.uri, str | None) and isinstance(settings.study_uri, str | None)
                    and isinstance(settings.down_timeout_s, int | float)):
                return settings
            reason = "uri and study_uri must be strings or null, down_timeout_s a number"
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as error:  # TypeError: not these fields
            reason = str(error)
        raise DamagedFile(f"{path} is damaged ({reason}): it holds the search's tracking settings; restore it from "
                          f"a copy, or start the search again with `dettune search SPACE --overwrite`")


@dataclass
class _RunState:
    run_id: str
    logged_epochs: set[int]
    ended: bool = False  # this tracker recorded the trial's end, or found it recorded in a listing


class Tracker:
    """Writes one search to MLflow through an explicit client (no process-global active run)."""

    def __init__(self, tracking_uri: str, search: str, *, artifact_root: Path | None = None,
                 fresh: bool = False) -> None:
        self.client = MlflowClient(tracking_uri)
        self.tracking_uri = without_credentials(tracking_uri)
        self.search = search
        self.experiment_id, created = self._experiment(artifact_root)
        self._runs: dict[str, _RunState] = {}
        self._last_claim: int | None = None  # the highest Exp num this tracker claimed
        if fresh:
            self._discard_runs()
        self.parent_run_id = self._find_or_create_parent(creator=created or fresh)

    def _experiment(self, artifact_root: Path | None) -> tuple[str, bool]:
        """The search's experiment id, and whether this tracker created it (the name is unique in a store)."""
        experiment = self.client.get_experiment_by_name(self.search)
        if experiment is not None:
            return experiment.experiment_id, False
        location = artifact_root.resolve().as_uri() if artifact_root is not None else None
        try:
            return self.client.create_experiment(self.search, artifact_location=location, tags=EXPERIMENT_TAGS), True
        except MlflowException as error:  # another driver created it since we looked
            experiment = self.client.get_experiment_by_name(self.search)
            if error.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS) or experiment is None:
                raise
        return experiment.experiment_id, False

    # --- lookup ---------------------------------------------------------------------------------------

    def _find(self, **tags: str) -> Run | None:
        runs = find_runs(self.client, self.experiment_id, {TAG_SEARCH: self.search, **tags}, max_results=1)
        return runs[0] if runs else None

    def _discard_runs(self) -> None:
        """Deletes every run of this search (MLflow keeps them restorable), for ``--overwrite``."""
        for run in find_runs(self.client, self.experiment_id, {TAG_SEARCH: self.search}, max_results=50000):
            self.client.delete_run(run.info.run_id)

    def _find_or_create_parent(self, *, creator: bool, wait_s: float = 30.0) -> str:
        """The parent run; the driver that created the experiment creates it, another one waits for it.

        A parent still missing after ``wait_s`` (its creator died in between, or the runs were deleted) is
        created here.
        """
        deadline = time.monotonic() + (0.0 if creator else wait_s)
        while (found := self._find(**{TAG_ROLE: "parent"})) is None and time.monotonic() < deadline:
            time.sleep(0.5)
        if found is not None:
            return str(found.info.run_id)
        run = self.client.create_run(self.experiment_id, run_name=self.search,
                                     tags={TAG_SEARCH: self.search, TAG_ROLE: "parent"})
        return str(run.info.run_id)

    def trial_runs(self) -> list[Run]:
        """Every trial run of this search, in the order they were created."""
        return find_runs(self.client, self.experiment_id, {TAG_SEARCH: self.search, TAG_ROLE: "trial"})

    # --- parent ---------------------------------------------------------------------------------------

    def describe_search(self, *, tags: Mapping[str, str], space_yaml: str, space_json: str) -> None:
        """Tags the parent run and stores the space (as written, and as reloadable JSON)."""
        self.client.log_batch(self.parent_run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        self.client.log_text(self.parent_run_id, space_yaml, "space.yaml")
        self.client.log_text(self.parent_run_id, space_json, "space.json")

    def save_runs_view(self, metric: str, mode: str) -> None:
        """Saves the view of the runs table that the printed page opens (:func:`tracking_names.experiment_page`):
        the trial runs, the best by ``metric`` (``mode`` "max" or "min") first, with it and the log's metric columns.

        An experiment tag in the format of the UI's own "Save as new view" (it lists it under Views, too),
        rewritten at every driver start, so a search started before dettune saved it gets it when resumed.
        """
        columns = [f"metrics.`{key}`" for key in dict.fromkeys([metric, *COST_METRICS, *LOG_METRICS])]
        state = {"searchFilter": run_filter({TAG_ROLE: "trial"}), "orderByKey": f"metrics.`{metric}`",
                 "orderByAsc": mode == "min", "selectedColumns": columns, "columnOrder": columns}
        view = {"name": f"{self.search} trials", "createdAt": int(time.time() * 1000), "state": json.dumps(state)}
        self.client.set_experiment_tag(self.experiment_id, SHARED_VIEW_TAG + RUNS_VIEW, json.dumps(view))

    def record_best(self, params: Mapping[str, Any], metrics: Mapping[str, float], *, epoch: int,
                    trial_id: str) -> bool:
        """Gives the parent run the best trial's knob values (tags ``dettune.best.<knob>``) and metrics at its epoch.

        Knob values are tags because MLflow params can't change when a resumed search finds a better trial. The
        same best recorded again (a resume) writes nothing, so no point is doubled. Returns whether it wrote.
        """
        tags = self.client.get_run(self.parent_run_id).data.tags
        if (tags.get(TAG_BEST_TRIAL), tags.get(TAG_BEST_EPOCH)) == (trial_id, str(epoch)):
            return False
        stamp = now_ms()
        knobs = [RunTag(TAG_BEST_KNOB + k, param_text(v)) for k, v in params.items()]
        self.client.log_batch(
            self.parent_run_id,
            metrics=[Metric(k, float(v), stamp, epoch) for k, v in metrics.items() if is_log_column(k)],
            tags=[*knobs, RunTag(TAG_BEST_TRIAL, trial_id), RunTag(TAG_BEST_EPOCH, str(epoch))])
        return True

    def mark_pareto(self, front: Sequence[str]) -> None:
        """Tags every trial run on or off the Pareto front (trial ids), and the parent with the front's Exp nums."""
        exp_nums = []
        for run in self.trial_runs():
            on_front = run.data.tags.get(TAG_TRIAL) in front
            if on_front:
                exp_nums.append(run.data.tags.get(TAG_EXP_NUM, run.info.run_id))
            self.client.set_tag(run.info.run_id, TAG_PARETO, "true" if on_front else "false")
        self.client.set_tag(self.parent_run_id, TAG_FRONT, ", ".join(exp_nums))

    def finish_search(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.parent_run_id, status)

    # --- trials ---------------------------------------------------------------------------------------

    def start_trial(self, trial_id: str, params: Mapping[str, Any], *, listed: Mapping[str, Run] | None = None,
                    every_row_has: Collection[str] = ()) -> str:
        """Returns the trial's run, creating it (nested under the parent) the first time.

        ``listed``: the search's trial runs read at once (:meth:`runs_by_trial`), taken instead of a search for this
        one where no other writer can have created or ended its run since (so an end it records is not read again
        by :meth:`end_trial`). ``every_row_has``: keys every row of the trial
        holds: an epoch's row is one write, so the history of one of them tells which epochs an existing run holds
        (else every key's history is read: ~30 requests a run).
        """
        if trial_id in self._runs:
            return self._runs[trial_id].run_id
        found = listed.get(trial_id) if listed is not None else self._find(**{TAG_TRIAL: trial_id})
        if found is None:
            run_id = str(self.client.create_run(self.experiment_id, tags={
                TAG_SEARCH: self.search, TAG_ROLE: "trial", TAG_TRIAL: trial_id,
                MLFLOW_PARENT_RUN_ID: self.parent_run_id, TAG_STATUS: "running"}).info.run_id)
            self._name_and_describe(run_id, params, new=True)
            self._runs[trial_id] = _RunState(run_id, set())
        else:
            run_id = str(found.info.run_id)
            if TAG_EXP_NUM not in found.data.tags:  # the server went away right after creating it
                self._name_and_describe(run_id, params, new=False)
            self._runs[trial_id] = _RunState(run_id, self._logged_epochs(run_id, found.data.metrics, every_row_has),
                                             ended=listed is not None and found.data.tags.get(TAG_STATUS) != "running")
        return run_id

    def runs_by_trial(self) -> dict[str, Run]:
        """Every trial run of this search, by trial id, in one listing."""
        return {run.data.tags[TAG_TRIAL]: run for run in self.trial_runs() if TAG_TRIAL in run.data.tags}

    def _name_and_describe(self, run_id: str, params: Mapping[str, Any], *, new: bool) -> None:
        """Numbers the run and writes its knob values, in one write: a run has both or neither."""
        exp_num = self._claim_number(run_id, new=new)
        self.client.log_batch(run_id, params=[Param(k, param_text(v)) for k, v in params.items()],
                              tags=[RunTag(TAG_EXP_NUM, exp_num), RunTag(MLFLOW_RUN_NAME, exp_num)])

    def _claim_number(self, run_id: str, *, new: bool) -> str:
        """Claims ``<search>-<n>`` for the run, with the lowest n no other run has claimed, and returns it.

        The claim is the parent's param ``exp_num.<n>`` = the run's id: MLflow refuses to change a param, so of
        two drivers claiming one n at the same moment exactly one succeeds and the other tries again. A run this
        driver has just created starts above the number it claimed last, without reading the parent's claims
        (one request fewer per trial); a refused claim reads them and goes on above them all.
        """
        if new and self._last_claim is not None:
            n = self._last_claim
        else:
            claims = self._claims()
            mine = [k for k, v in claims.items() if v == run_id]
            if mine:
                n = mine[0] - 1
            elif claims:  # the first claim came after every run numbered before claims: above them all
                n = max(claims)
            else:  # the search's first claim: after the runs a store older than claims numbered
                n = sum(1 for r in self.trial_runs() if TAG_EXP_NUM in r.data.tags)
        while True:
            n += 1
            try:
                self.client.log_param(self.parent_run_id, f"{EXP_NUM_CLAIM}{n}", run_id)
            except MlflowException as error:
                if error.error_code != ErrorCode.Name(INVALID_PARAMETER_VALUE):
                    raise
                n = max(n, *self._claims())
                continue
            self._last_claim = n
            return f"{self.search}-{n}"

    def _claims(self) -> dict[int, str]:
        """The parent's claims: number -> the run that holds it."""
        params = self.client.get_run(self.parent_run_id).data.params
        return {int(k.removeprefix(EXP_NUM_CLAIM)): v for k, v in params.items() if k.startswith(EXP_NUM_CLAIM)}

    def _logged_epochs(self, run_id: str, latest: Mapping[str, float], every_row_has: Collection[str]) -> set[int]:
        keys = sorted(set(every_row_has) & set(latest))[:1] or list(latest)
        return {int(m.step) for key in keys for m in self.client.get_metric_history(run_id, key)}

    def log_epoch(self, trial_id: str, result: Mapping[str, Any], *, stamp_ms: int | None = None) -> bool:
        """Writes one epoch's log columns at step = epoch, unless the run already has that epoch.

        ``stamp_ms`` is the points' timestamp (default: now). A caller that may send the same row again gives the
        time it first had the row: a write the server committed but whose reply was lost then comes back identical,
        and MLflow's store drops identical points instead of recording the epoch twice.
        """
        state = self._runs[trial_id]
        epoch = int(result["epoch"])
        if epoch in state.logged_epochs:
            return False
        stamp = now_ms() if stamp_ms is None else stamp_ms
        metrics = [Metric(k, float(v), stamp, epoch) for k, v in result.items()
                   if is_tracked(k) and isinstance(v, (int, float))]
        self.client.log_batch(state.run_id, metrics=metrics)
        state.logged_epochs.add(epoch)
        return True

    def end_trial(self, trial_id: str, *, status: str, stopped_at: int | None = None,
                  failure: str | None = None, stopped_by: str | None = None, only_if_open: bool = False) -> None:
        """Tags how the trial ended (completed, stopped by ASHA or the time budget at epoch k, failed: reason) and
        closes it.

        With ``only_if_open`` a run that already records its end is left as it is.
        """
        state = self._runs[trial_id]
        run_id = state.run_id
        if only_if_open and (state.ended or self.client.get_run(run_id).data.tags.get(TAG_STATUS) != "running"):
            return
        tags = [RunTag(TAG_STATUS, status)]
        if stopped_at is not None:
            tags.append(RunTag(TAG_STOPPED_AT, str(stopped_at)))
        if stopped_by is not None:
            tags.append(RunTag(TAG_STOPPED_BY, stopped_by))
        if failure is not None:
            tags.append(RunTag(TAG_FAILURE, failure[:4000]))
        self.client.log_batch(run_id, tags=tags)
        self.client.set_terminated(run_id, "FAILED" if status == "failed" else "FINISHED")
        state.ended = True


def now_ms() -> int:
    """The time as MLflow stamps its points: milliseconds since the epoch."""
    return int(time.time() * 1000)
