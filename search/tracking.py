"""MLflow bookkeeping: one parent run per search, exactly one nested run per trial, each point once.

The trial -> run mapping is durable: every run carries tags (``dettune.search``, ``dettune.trial_id``), and a
run is looked up by them before one is created. After ``dettune resume`` or a retried trial the same run
continues. Which epochs a run already holds is read back from MLflow, so a point is never written twice.

Two drivers may write the same search to one store: the experiment's unique name decides which one creates the
parent run, and each trial number (``<search>-<n>``) is claimed as a parent param, which MLflow never changes.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
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
from spaces.errors import BadArgument, DamagedFile, UserError

TAG_SEARCH = "dettune.search"
TAG_ROLE = "dettune.role"  # "parent", "trial", or ROLE_ENSEMBLE
ROLE_ENSEMBLE = "ensemble"  # a run of `dettune ensemble`: trials' checkpoints fused, nested under the parent
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
TAG_BEST_TRIAL = "dettune.best_trial"
TAG_BEST_EPOCH = "dettune.best_epoch"
EXP_NUM_CLAIM = "exp_num."  # + n: a parent param naming the run that holds Exp num <search>-<n>
TAG_BEST_KNOB = "dettune.best."  # + knob name: the best trial's value (a tag, since params can't change)
LOGGED_PREFIXES = ("val/", "train/", "inference/", "model/", "lb/")
LOCAL_STORE = "mlflow.db"  # the embedded default store, in the storage folder
DEFAULT_STORAGE = Path("runs")
"""Every command's default ``--storage``: its SQLite store is the default tracking URI too."""
DEFAULT_TRACKING_TIMEOUT_S = 600.0
"""How long MLflow may stay unreachable before a search stops to be resumed (``--tracking-timeout``)."""


def is_log_column(key: str) -> bool:
    """Whether a result key is one of the experiment log's metric columns."""
    return key.startswith(LOGGED_PREFIXES)


def is_tracked(key: str) -> bool:
    """Whether a result key is written to the trial's run: the log's columns, and the score ASHA ranked it by."""
    return is_log_column(key) or key == RUNG_SCORE


def local_tracking_uri(storage: Path) -> str:
    """The embedded default: a SQLite store next to the search's Ray storage."""
    return f"sqlite:///{(storage / LOCAL_STORE).resolve()}"


def without_credentials(uri: str) -> str:
    """``uri`` without a ``user:password@`` part, for anything printed or written to a file."""
    parts = urllib.parse.urlsplit(uri)
    if not (parts.username or parts.password):
        return uri
    return parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1]).geturl()


def use_credentials(uri: str) -> str:
    """Moves a ``user:password@`` in ``uri`` to MLflow's credential variables; returns the URI without it.

    Only this process and its children see the variables, so no file, pickled state or message carries the
    credentials.
    """
    parts = urllib.parse.urlsplit(uri)
    if parts.username:
        os.environ["MLFLOW_TRACKING_USERNAME"] = urllib.parse.unquote(parts.username)
    if parts.password:
        os.environ["MLFLOW_TRACKING_PASSWORD"] = urllib.parse.unquote(parts.password)
    return without_credentials(uri)


@dataclass(frozen=True, kw_only=True)
class TrackingSettings:
    """Where a search's MLflow writes go and how long an outage may last, saved beside its Ray results.

    A resumed search reads them back, with any of them changed on its command line; the driver's callbacks
    rebuild their :class:`Tracker` from them, so a new ``--tracking-uri`` reaches them too.
    """

    uri: str | None = None
    """Without credentials; None is the SQLite store beside the Ray storage."""
    down_timeout_s: float = DEFAULT_TRACKING_TIMEOUT_S

    def effective_uri(self, storage: Path) -> str:
        return self.uri or local_tracking_uri(storage)

    def tracker(self, storage: Path, search: str, *, fresh: bool = False) -> Tracker:
        """The search's tracker; the local default keeps artifacts under ``storage/mlartifacts``."""
        if self.uri is None:
            ensure_store(storage / LOCAL_STORE)
        return Tracker(self.effective_uri(storage), search, fresh=fresh,
                       artifact_root=None if self.uri else storage / "mlartifacts")

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self)))

    @classmethod
    def load(cls, path: Path) -> TrackingSettings:
        """Reads what :meth:`save` wrote.

        Raises:
            DamagedFile: The file is not the JSON object of these settings (edited by hand, cut short).
        """
        try:
            settings = cls(**json.loads(path.read_text()))
            if isinstance(settings.uri, str | None) and isinstance(settings.down_timeout_s, int | float):
                return settings
            reason = "uri must be a string or null, down_timeout_s a number"
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as error:  # TypeError: not these fields
            reason = str(error)
        raise DamagedFile(f"{path} is damaged ({reason}): it holds the search's tracking settings; restore it from "
                          f"a copy, or start the search again with `dettune search SPACE --overwrite`")


def param_text(value: Any) -> str:
    """A knob value as an MLflow param and wherever params are compared: ``[800, 800]`` -> ``800x800``."""
    return "x".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)


def outcome_text(status: str, *, stopped_at: int | None = None, failure: str | None = None) -> str:
    """How a trial ended, as the console, the end-of-search table and the report say it."""
    if status == "stopped" and stopped_at == 0:  # the search stopped before this trial trained an epoch
        return "stopped before its first epoch"
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
        raise TrackingUnreachable(f"MLflow tracking server {without_credentials(tracking_uri)} is unreachable "
                                  f"({exc}): start it, or fix --tracking-uri (omit it to use a local SQLite "
                                  "store)") from None


@dataclass
class _RunState:
    run_id: str
    logged_epochs: set[int]


class Tracker:
    """Writes one search to MLflow through an explicit client (no process-global active run)."""

    def __init__(self, tracking_uri: str, search: str, *, artifact_root: Path | None = None,
                 fresh: bool = False) -> None:
        self.client = MlflowClient(tracking_uri)
        self.tracking_uri = without_credentials(tracking_uri)
        self.search = search
        self.experiment_id, created = self._experiment(artifact_root)
        self._runs: dict[str, _RunState] = {}
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
            return self.client.create_experiment(self.search, artifact_location=location), True
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

    def start_trial(self, trial_id: str, params: Mapping[str, Any]) -> str:
        """Returns the trial's run, creating it (nested under the parent) the first time."""
        if trial_id in self._runs:
            return self._runs[trial_id].run_id
        found = self._find(**{TAG_TRIAL: trial_id})
        if found is None:
            run_id = str(self.client.create_run(self.experiment_id, tags={
                TAG_SEARCH: self.search, TAG_ROLE: "trial", TAG_TRIAL: trial_id,
                MLFLOW_PARENT_RUN_ID: self.parent_run_id, TAG_STATUS: "running"}).info.run_id)
            self._number(run_id)
            self.client.log_batch(run_id, params=[Param(k, param_text(v)) for k, v in params.items()])
            self._runs[trial_id] = _RunState(run_id, set())
        else:
            run_id = str(found.info.run_id)
            if TAG_EXP_NUM not in found.data.tags:  # the server went away right after creating it
                self._number(run_id)
            self._runs[trial_id] = _RunState(run_id, self._logged_epochs(run_id, found.data.metrics))
        return run_id

    def _number(self, run_id: str) -> str:
        """Names a new trial run ``<search>-<n>`` with the lowest n no other run has claimed.

        The claim is the parent's param ``exp_num.<n>`` = the run's id: MLflow refuses to change a param, so of
        two drivers claiming one n at the same moment exactly one succeeds and the other tries the next.
        """
        claims = {int(k.removeprefix(EXP_NUM_CLAIM)): v for k, v in
                  self.client.get_run(self.parent_run_id).data.params.items() if k.startswith(EXP_NUM_CLAIM)}
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
                continue
            exp_num = f"{self.search}-{n}"
            self.client.log_batch(run_id, tags=[RunTag(TAG_EXP_NUM, exp_num), RunTag(MLFLOW_RUN_NAME, exp_num)])
            return exp_num

    def _logged_epochs(self, run_id: str, latest: Mapping[str, float]) -> set[int]:
        return {int(m.step) for key in latest for m in self.client.get_metric_history(run_id, key)}

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


def now_ms() -> int:
    """The time as MLflow stamps its points: milliseconds since the epoch."""
    return int(time.time() * 1000)
