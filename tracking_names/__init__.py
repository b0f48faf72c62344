"""What the search writes to MLflow and ``results`` reads back: the names, filters and texts both sides share.

The bottom of the tracking side: tag names, the default storage and its SQLite store, the tracking timeout,
how a trial's outcome reads, the one builder of filter strings, and the check that a tracking server answers.
``search`` writes with them (:mod:`search.tracking`), ``results`` reads with them, and this package imports
neither, so imports between the two go one way.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from spaces.errors import BadArgument, UserError

TAG_SEARCH = "dettune.search"
TAG_ROLE = "dettune.role"  # "parent", "trial", or ROLE_ENSEMBLE
ROLE_ENSEMBLE = "ensemble"  # a run of `dettune ensemble`: trials' checkpoints fused, nested under the parent
TAG_TRIAL = "dettune.trial_id"
TAG_EXP_NUM = "dettune.exp_num"
TAG_STATUS = "dettune.status"
TAG_STOPPED_AT = "dettune.stopped_at_epoch"
TAG_STOPPED_BY = "dettune.stopped_by"  # STOPPED_BY_BUDGET on a trial the time budget stopped (else ASHA did)
STOPPED_BY_BUDGET = "budget"
TAG_BUDGET = "dettune.budget"  # on the parent: the time budget of its last driver, and when it ends
TAG_ENDED_BECAUSE = "dettune.ended_because"  # on the parent, with a time budget: why the search ended
TAG_FAILURE = "dettune.failure"
TAG_PARETO = "dettune.pareto"  # "true" on the trials of the Pareto front, "false" on the others
TAG_FRONT = "dettune.pareto_front"  # on the parent: the front's Exp nums
TAG_STORAGE = "dettune.storage"  # the search's Ray experiment directory (trial checkpoints live there)
TAG_INHERITED = "dettune.inherited"  # one line per knob taken from an earlier search's best trial
TAG_WARM_START = "dettune.warm_start"  # which earlier trials the searcher was told before it started
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}
"""The experiment's kind as MLflow records it: model training, not a GenAI app. MLflow 3.17's UI no longer
chooses its view by it (see :func:`experiment_page`)."""
TAG_BEST_TRIAL = "dettune.best_trial"
TAG_BEST_EPOCH = "dettune.best_epoch"
EXP_NUM_CLAIM = "exp_num."  # + n: a parent param naming the run that holds Exp num <search>-<n>
TAG_BEST_KNOB = "dettune.best."  # + knob name: the best trial's value (a tag, since params can't change)
LOGGED_PREFIXES = ("val/", "train/", "inference/", "model/", "lb/")
LOG_METRICS = ("val/bbox_mAP", "val/bbox_mAP_50", "val/bbox_mAP_75", "val/bbox_mAP_l", "val/bbox_mAP_m",
               "val/bbox_mAP_s", "train/loss_rpn_cls", "train/s1.loss_bbox", "train/s2.loss_cls", "train/s1.acc",
               "train/s2.acc", "train/loss")
"""The experiment log's metric columns, in its order: the report's table and the runs view in MLflow's UI."""
LOCAL_STORE = "mlflow.db"  # the embedded default store, in the storage folder
STUDY_STORE = "optuna.db"  # the Optuna storage optuna-dashboard opens, beside it
DEFAULT_STORAGE = Path("runs")
"""Every command's default ``--storage``: its SQLite store is the default tracking URI too."""
DEFAULT_TRACKING_TIMEOUT_S = 600.0
"""How long MLflow may stay unreachable before a search stops to be resumed (``--tracking-timeout``)."""


def is_log_column(key: str) -> bool:
    """Whether a result key is one of the experiment log's metric columns."""
    return key.startswith(LOGGED_PREFIXES)


def local_tracking_uri(storage: Path) -> str:
    """The embedded default: a SQLite store next to the search's Ray storage."""
    return f"sqlite:///{(storage / LOCAL_STORE).resolve()}"


def local_study_uri(storage: Path) -> str:
    """The Optuna storage where the searches kept in ``storage`` copy their studies: SQLite beside MLflow's."""
    return f"sqlite:///{(storage / STUDY_STORE).resolve()}"


def without_credentials(uri: str) -> str:
    """``uri`` without a ``user:password@`` part, for anything printed or written to a file."""
    parts = urllib.parse.urlsplit(uri)
    if not (parts.username or parts.password):
        return uri
    return parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1]).geturl()


RUNS_VIEW = "dettune"
"""The share key of the runs-table view dettune saves on each search's experiment (see :func:`experiment_page`)."""
SHARED_VIEW_TAG = "mlflow.sharedViewState."
"""+ a share key: an experiment tag holding a view of the runs table, as MLflow's UI saves one ("Save as new
view") and opens when the page's ``viewStateShareKey`` names it."""


def experiment_page(server: str, experiment_id: str) -> str:
    """The experiment's runs table on an MLflow server, in the view the search saved (``search.tracking``).

    MLflow 3.17's UI takes the model-training view (runs, metrics, charts) from ``workflowType``, else from the
    browser's last choice, else its GenAI view (traces, prompts): never from the experiment's kind tag. The page is
    the ``runs`` tab itself: the UI's redirect from the bare experiment page keeps ``workflowType`` and drops
    ``viewStateShareKey``.
    """
    return (f"{without_credentials(server).rstrip('/')}/#/experiments/{experiment_id}/runs"
            f"?workflowType=machine_learning&viewStateShareKey={RUNS_VIEW}")


def credential_variables(uri: str, user_variable: str, password_variable: str) -> dict[str, str]:
    """The ``user:password@`` of ``uri``, unquoted, under the names of the variables a client reads them from."""
    parts = urllib.parse.urlsplit(uri)
    found = {user_variable: parts.username, password_variable: parts.password}
    return {name: urllib.parse.unquote(value) for name, value in found.items() if value}


def use_database_credentials(uri: str) -> str:
    """Moves a ``user:password@`` in a PostgreSQL URL to libpq's ``PGUSER``/``PGPASSWORD``; returns the URL
    without it (written to search.json and pickled with the searcher, so it must not hold them).

    Raises:
        BadArgument: Credentials in a URL of another database, which has no such variables.
    """
    variables = credential_variables(uri, "PGUSER", "PGPASSWORD")
    if not variables:
        return uri
    if not urllib.parse.urlsplit(uri).scheme.startswith("postgresql"):
        raise BadArgument(f"{without_credentials(uri)}: credentials in the URL are taken for PostgreSQL only "
                          "(moved to PGUSER/PGPASSWORD, never written); use PostgreSQL or a database that needs none")
    os.environ.update(variables)
    return without_credentials(uri)


def use_credentials(uri: str) -> str:
    """Moves a ``user:password@`` in ``uri`` to MLflow's credential variables; returns the URI without it.

    Only this process and its children see the variables, so no file, pickled state or message carries the
    credentials.
    """
    os.environ.update(credential_variables(uri, "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"))
    return without_credentials(uri)


def outcome_text(status: str, *, stopped_at: int | None = None, failure: str | None = None,
                 stopped_by: str | None = None) -> str:
    """How a trial ended, as the console, the end-of-search table and the report say it."""
    if status == "stopped" and stopped_at == 0:  # the search stopped before this trial trained an epoch
        return "stopped before its first epoch"
    if status == "stopped" and stopped_by == STOPPED_BY_BUDGET:
        return f"stopped at the time budget after epoch {stopped_at if stopped_at is not None else '?'}"
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
