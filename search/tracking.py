"""MLflow bookkeeping: one parent run per search, exactly one nested run per trial, each point once.

The trial -> run mapping is durable: every run carries tags (``dettune.search``, ``dettune.trial_id``), and a
run is looked up by them before one is created. After ``dettune resume`` or a retried trial the same run
continues. Which epochs a run already holds is read back from MLflow, so a point is never written twice.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, Run, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from spaces.errors import BadArgument, UserError

TAG_SEARCH = "dettune.search"
TAG_ROLE = "dettune.role"
TAG_TRIAL = "dettune.trial_id"
TAG_EXP_NUM = "dettune.exp_num"
TAG_STATUS = "dettune.status"
TAG_STOPPED_AT = "dettune.stopped_at_epoch"
TAG_FAILURE = "dettune.failure"
TAG_PARETO = "dettune.pareto"  # "true" on the trials of the Pareto front, "false" on the others
TAG_FRONT = "dettune.pareto_front"  # on the parent: the front's Exp nums
TAG_STORAGE = "dettune.storage"  # the search's Ray experiment directory (trial checkpoints live there)
TAG_INHERITED = "dettune.inherited"  # one line per knob taken from an earlier search's best trial
TAG_WARM_START = "dettune.warm_start"  # which earlier trials the searcher was told before it started
LOGGED_PREFIXES = ("val/", "train/", "inference/", "model/", "lb/")


def is_log_column(key: str) -> bool:
    """Whether a result key is one of the experiment log's metric columns."""
    return key.startswith(LOGGED_PREFIXES)


def local_tracking_uri(storage: Path) -> str:
    """The embedded default: a SQLite store next to the search's Ray storage."""
    return f"sqlite:///{(storage / 'mlflow.db').resolve()}"


def without_credentials(uri: str) -> str:
    """``uri`` without a ``user:password@`` part, for anything printed or written to a file."""
    parts = urllib.parse.urlsplit(uri)
    if not (parts.username or parts.password):
        return uri
    return parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1]).geturl()


def param_text(value: Any) -> str:
    """A knob value as an MLflow param and wherever params are compared: ``[800, 800]`` -> ``800x800``."""
    return "x".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)


def outcome_text(status: str, *, stopped_at: int | None = None, failure: str | None = None) -> str:
    """How a trial ended, as the console, the end-of-search table and the report say it."""
    if status == "stopped":
        return f"stopped by ASHA at epoch {stopped_at if stopped_at is not None else '?'}"
    if status == "failed":
        return f"failed: {failure or 'no reason recorded'}"
    return status


def run_filter(tags: Mapping[str, str]) -> str:
    """An MLflow filter string matching runs with exactly these tag values.

    MLflow's filter grammar has no escape for a quote inside a value, so such a value is refused.

    Raises:
        BadArgument: a value holds a quote or backtick.
    """
    for value in tags.values():
        if any(quote in value for quote in "'\"`"):
            raise BadArgument(f"{value!r} holds a quote: search, trial and run names are letters, digits, "
                              "'_', '.' and '-'")
    return " and ".join(f"tags.`{key}` = '{value}'" for key, value in tags.items())


def find_runs(client: MlflowClient, experiment_id: str, tags: Mapping[str, str], *,
              max_results: int = 10000) -> list[Run]:
    """The experiment's live runs with these tag values, oldest first."""
    return list(client.search_runs([experiment_id], filter_string=run_filter(tags), max_results=max_results,
                                   order_by=["attributes.start_time ASC"]))


class TrackingUnreachable(UserError, ConnectionError):
    """The MLflow tracking server does not answer; the message names it and what to check."""


def check_reachable(tracking_uri: str, timeout_s: float = 10.0) -> None:
    """Fails fast when an HTTP tracking server does not answer (MLflow's client would retry for minutes).

    Any HTTP answer counts, 401 included: credentials are the client's business.
    """
    if not tracking_uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(f"{tracking_uri.rstrip('/')}/health", timeout=timeout_s).close()
    except urllib.error.HTTPError:
        return
    except OSError as exc:
        raise TrackingUnreachable(f"MLflow tracking server {tracking_uri} is unreachable ({exc}): start it, "
                                  "or fix --tracking-uri (omit it to use a local SQLite store)") from None


@dataclass
class _RunState:
    run_id: str
    logged_epochs: set[int]


class Tracker:
    """Writes one search to MLflow through an explicit client (no process-global active run)."""

    def __init__(self, tracking_uri: str, search: str, *, artifact_root: Path | None = None,
                 fresh: bool = False) -> None:
        self.client = MlflowClient(tracking_uri)
        self.tracking_uri = tracking_uri
        self.search = search
        self._artifact_root = artifact_root
        experiment = self.client.get_experiment_by_name(search)
        if experiment is None:
            location = artifact_root.resolve().as_uri() if artifact_root is not None else None
            self.experiment_id = self.client.create_experiment(search, artifact_location=location)
        else:
            self.experiment_id = experiment.experiment_id
        self._runs: dict[str, _RunState] = {}
        if fresh:
            self._discard_runs()
        self.parent_run_id = self._find_or_create_parent()

    def __getstate__(self) -> dict[str, Any]:
        """Tune pickles callbacks with its experiment state: keep the address, not the connection."""
        return {"tracking_uri": self.tracking_uri, "search": self.search, "artifact_root": self._artifact_root}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["tracking_uri"], state["search"], artifact_root=state["artifact_root"])  # type: ignore[misc]

    # --- lookup ---------------------------------------------------------------------------------------

    def _find(self, **tags: str) -> Run | None:
        runs = find_runs(self.client, self.experiment_id, {TAG_SEARCH: self.search, **tags}, max_results=1)
        return runs[0] if runs else None

    def _discard_runs(self) -> None:
        """Deletes every run of this search (MLflow keeps them restorable), for ``--overwrite``."""
        for run in find_runs(self.client, self.experiment_id, {TAG_SEARCH: self.search}, max_results=50000):
            self.client.delete_run(run.info.run_id)

    def _find_or_create_parent(self) -> str:
        found = self._find(**{TAG_ROLE: "parent"})
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

    def record_best(self, params: Mapping[str, Any], metrics: Mapping[str, float], *, epoch: int,
                    trial_id: str) -> None:
        """Gives the parent run the best trial's params and metrics (params once: MLflow can't change them)."""
        existing = self.client.get_run(self.parent_run_id).data.params
        new_params = [Param(k, param_text(v)) for k, v in params.items() if k not in existing]
        stamp = _now_ms()
        self.client.log_batch(
            self.parent_run_id,
            metrics=[Metric(k, float(v), stamp, epoch) for k, v in metrics.items() if is_log_column(k)],
            params=new_params, tags=[RunTag("dettune.best_trial", trial_id)])

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

    def start_trial(self, trial_id: str, params: Mapping[str, Any]) -> str:
        """Returns the trial's run, creating it (nested under the parent) the first time."""
        if trial_id in self._runs:
            return self._runs[trial_id].run_id
        found = self._find(**{TAG_TRIAL: trial_id})
        if found is None:
            exp_num = f"{self.search}-{len(self.trial_runs()) + 1}"
            run = self.client.create_run(self.experiment_id, run_name=exp_num, tags={
                TAG_SEARCH: self.search, TAG_ROLE: "trial", TAG_TRIAL: trial_id, TAG_EXP_NUM: exp_num,
                MLFLOW_PARENT_RUN_ID: self.parent_run_id, MLFLOW_RUN_NAME: exp_num, TAG_STATUS: "running"})
            run_id = str(run.info.run_id)
            self.client.log_batch(run_id, params=[Param(k, param_text(v)) for k, v in params.items()])
            self._runs[trial_id] = _RunState(run_id, set())
        else:
            run_id = str(found.info.run_id)
            self._runs[trial_id] = _RunState(run_id, self._logged_epochs(run_id, found.data.metrics))
        return run_id

    def _logged_epochs(self, run_id: str, latest: Mapping[str, float]) -> set[int]:
        return {int(m.step) for key in latest for m in self.client.get_metric_history(run_id, key)}

    def log_epoch(self, trial_id: str, result: Mapping[str, Any]) -> bool:
        """Writes one epoch's log columns at step = epoch, unless the run already has that epoch."""
        state = self._runs[trial_id]
        epoch = int(result["epoch"])
        if epoch in state.logged_epochs:
            return False
        stamp = _now_ms()
        metrics = [Metric(k, float(v), stamp, epoch) for k, v in result.items()
                   if is_log_column(k) and isinstance(v, (int, float))]
        self.client.log_batch(state.run_id, metrics=metrics)
        state.logged_epochs.add(epoch)
        return True

    def end_trial(self, trial_id: str, *, status: str, stopped_at: int | None = None,
                  failure: str | None = None, only_if_open: bool = False) -> None:
        """Tags how the trial ended (completed, stopped by ASHA at epoch k, failed: reason) and closes it.

        With ``only_if_open`` a run that already records its end is left as it is.
        """
        run_id = self._runs[trial_id].run_id
        if only_if_open and self.client.get_run(run_id).data.tags.get(TAG_STATUS) != "running":
            return
        tags = [RunTag(TAG_STATUS, status)]
        if stopped_at is not None:
            tags.append(RunTag(TAG_STOPPED_AT, str(stopped_at)))
        if failure is not None:
            tags.append(RunTag(TAG_FAILURE, failure[:4000]))
        self.client.log_batch(run_id, tags=tags)
        self.client.set_terminated(run_id, "FAILED" if status == "failed" else "FINISHED")


def _now_ms() -> int:
    return int(time.time() * 1000)
