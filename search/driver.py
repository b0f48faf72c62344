"""The search driver: assemble Ray Tune (searcher, ASHA, resources, storage, callbacks) and run it.

Searchers: Optuna TPE (Bergstra et al., "Algorithms for Hyper-Parameter Optimization", NeurIPS 2011) or NSGA-II
through dettune's own Tune searcher over Optuna's ask/tell (:mod:`search.optuna_search`, over one or several
objectives), random sampling, or Tune's grid search. Early stopping: ASHA (Li et al., "A System for Massively
Parallel Hyperparameter Tuning", MLSys 2020) with the epoch as its time attribute.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from mlflow.entities import Run
from ray import tune
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
from ray.tune.result import TRIAL_ID
from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.search import BasicVariantGenerator
from ray.tune.stopper import CombinedStopper

from cocodata.datacheck import CARD_FILE, DatasetCard, check_command
from cocodata.datacleaning import LEFT_OUT_FILE, TAG_LEFT_OUT, with_cleaned_files
from mmconfigs.build import MMDET_PREFIX, resolve_base
from mmconfigs.validate import Validation, check_space
from search import staging
from search.budget import (
    BudgetStopper,
    GatedSearcher,
    GatedVariants,
    LaunchGate,
    TimeBudget,
    closed_because,
    start_clock,
)
from search.callbacks import (
    SETUP_FAILURES_TO_STOP,
    ConsoleCallback,
    MlflowCallback,
    RepeatedSetupFailureStopper,
    failure_reason_of,
    repeated_setup_failure,
)
from search.resources import check_cluster
from search.rung import RUNG_SCORE, RecheckedASHA
from search.tracking import Tracker, TrackingSettings
from search.trainable import HIDE_UNASSIGNED_GPUS, TrialFunction, TrialPlan, tune_trial
from spaces.errors import NotFound, UserError
from spaces.knobs import show_value
from spaces.objectives import best_trial, feasible_front, trial_values
from spaces.schema import Space, load_space
from tracking_names import (
    DEFAULT_STORAGE,
    DEFAULT_TRACKING_TIMEOUT_S,
    STOPPED_BY_BUDGET,
    TAG_BUDGET,
    TAG_ENDED_BECAUSE,
    TAG_EXP_NUM,
    TAG_FAILURE,
    TAG_PARETO,
    TAG_STATUS,
    TAG_STOPPED_AT,
    TAG_STOPPED_BY,
    TAG_STORAGE,
    TAG_TRIAL,
    check_reachable,
    outcome_text,
    use_credentials,
    use_database_credentials,
)
from tracking_names.storage import Storage, open_storage, tracking_uri_for
from trainers.metrics import EPOCH
from trainers.smoke import first_step

LOST_TRIAL = ("lost: the driver stopped just after starting this trial, before Tune's snapshot held it; the resumed "
              "search went on without it")
KEPT_REPORTED_CHECKPOINTS = 2
"""Ray storage keeps each trial's best reported checkpoints, by the space's metric; export picks among them."""
SEARCH_ENVIRONMENT = {
    # Fail fast per request: the callback buffers and retries, so the client must not block the loop.
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    # Tune's default output engine prints its experiment-configuration box and TensorBoard hint even at
    # verbose=0; the legacy engine at verbose=0 prints nothing.
    "RAY_AIR_NEW_OUTPUT": "0",
    # Tune warns when forced experiment snapshots come often, which CheckpointConfig(num_to_keep) asks for by design.
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
    # Read by Tune's controller when it starts: with 0 it no longer logs every trial error with its traceback.
    "TUNE_PRINT_ALL_TRIAL_ERRORS": "0",
    # Tune's TensorBoard logger fsyncs an event file per result (21 ms of the driver's time per result at 100
    # trials) and MLflow holds every metric. The JSON and CSV loggers stay (export reads result.json): _tuner passes
    # them, and a restored Tuner keeps them.
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
    # On a tracking server MLflow reads each run back as it ends to print two links per trial; the search prints
    # its experiment's page once, in the view that lists the runs.
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
}
"""What Tune and MLflow read from the environment during a search (a value the user set wins)."""
SAVED_SPACE = "space.json"  # the effective space (file + command-line overrides); `dettune resume` reads it
SAVED_SPACE_FILE = "space.yaml"  # the space file as the user wrote it, logged on the parent run
SAVED_OPTIONS = "search.json"  # the search's TrackingSettings, without credentials
CLEANED_DATA = "data"  # with data.on_bad: skip, the cleaned annotation files the trials read
RAY_CONNECT_TIMEOUT_S = 10.0
RAY_START_TIMEOUT_VARIABLE = "DETTUNE_RAY_START_TIMEOUT_S"
DEFAULT_RAY_START_TIMEOUT_S = 180.0
"""A local Ray start takes 3-25 s on 2 busy cores; one that has not finished in minutes never will."""


class SearchExists(UserError, ValueError):
    """The search name is taken; the message says how to resume or overwrite it."""


class RayUnreachable(UserError, ConnectionError):
    """The Ray cluster at the given address does not answer; the message names it and the fix."""


class RayStartHung(RuntimeError):
    """Ray's local start did not finish in time: no fault of the input, and nothing of the search written yet."""


@dataclass(frozen=True, kw_only=True)
class SearchOptions:
    """The command line's settings for one search; None means "as the space file says"."""

    space_file: Path
    name: str | None = None
    address: str | None = None
    tracking_uri: str | None = None
    """May hold ``user:password@``: it is moved to MLflow's credential variables, never written."""
    storage: str | Path = DEFAULT_STORAGE
    """A local folder, or a URI pyarrow.fs opens (``s3://BUCKET/PREFIX``)."""
    trials: int | None = None
    epochs: int | None = None
    max_concurrent: int | None = None
    hours: float | None = None
    data_root: Path | None = None
    tracking_timeout_s: float = DEFAULT_TRACKING_TIMEOUT_S
    study_storage: str | None = None
    """The Optuna storage of the study copy; may hold ``user:password@`` (PostgreSQL), moved to PGUSER/PGPASSWORD."""
    resume: bool = False
    overwrite: bool = False


@dataclass(frozen=True, kw_only=True)
class SearchOutcome:
    """Where a search's results are, and how it went.

    Attributes:
        finished: Trials that trained at least one epoch and ended normally (completed, or stopped by ASHA or
            the time budget).
        stopped_because: Why the search stopped before its budget was spent, or None.
        budget_end: With a time budget, how the search ended against it (e.g. "budget of 2 h reached: ..."), or
            None without one.
    """

    name: str
    tracking_uri: str
    experiment_id: str
    experiment_dir: Path | str
    """A local folder, or the URI of one in an object store."""
    best_trial_id: str | None
    table: str
    finished: int
    stopped_because: str | None = None
    budget_end: str | None = None


def load_for_search(options: SearchOptions) -> Space:
    """The space with the command line's overrides (name, data, budget) applied and re-checked."""
    space = load_space(options.space_file)
    data = space.to_json()
    if options.name:
        data["name"] = options.name
    if options.data_root:
        data["data"]["root"] = str(options.data_root)
    for key, value in (("trials", options.trials), ("epochs", options.epochs),
                       ("max_concurrent", options.max_concurrent), ("hours", options.hours)):
        if value is not None:
            data["budget"][key] = value
    return Space.from_json(data, str(options.space_file))


def make_plan(space: Space, storage: Storage | Path) -> TrialPlan:
    """Resolves every path now, in the driver: trials run with another working directory, maybe elsewhere."""
    root = Path(space.data.root).resolve()
    base = space.base if space.base.startswith(MMDET_PREFIX) else str(resolve_base(space.base).resolve())
    budget = space.budget
    return TrialPlan(space=space.to_json(), base=base, data_root=str(root), workers=budget.workers_per_trial,
                     cpus_per_worker=budget.cpus_per_worker,
                     gpus_per_worker=budget.gpus_per_trial / budget.workers_per_trial,
                     storage=str(storage), name=space.name,
                     pretrained={k: str(Path(v).resolve()) for k, v in space.pretrained.items()})


LAUNCHER_MEMORY = 512 * 1024**2


def trial_resources(plan: TrialPlan) -> dict[str, float]:
    """With one worker the Tune trial trains itself; with more, Train's workers hold the CPUs and GPUs.

    The launching trial then only waits on its TorchTrainer, so it asks for memory alone (Tune needs a
    non-empty bundle); a CPU of its own would leave a 2-worker trial unplaceable on a 2-CPU node.
    """
    if plan.workers == 1:
        return {"CPU": plan.cpus_per_worker, "GPU": plan.gpus_per_worker}
    return {"CPU": 0, "memory": LAUNCHER_MEMORY}


def make_searcher(space: Space, staged: staging.Staging | None = None, *, settings_file: Path | Storage | None = None,
                  gate: LaunchGate | None = None) -> tuple[Any, dict[str, Any], int]:
    """The search algorithm (limited to ``budget.max_concurrent`` trials at a time), the Tuner's
    param_space, and num_samples, for the space's algorithm.

    With ``staged`` warm-start points, TPE starts from a study that already holds them and a grid search
    trains only the points no earlier search trained to the full budget. With the search's saved
    ``settings_file``, an Optuna searcher's finished trials are copied to its Optuna storage (for optuna-dashboard).
    With a ``gate`` (the time budget's), the algorithm suggests nothing more once the gate closes.
    """
    algorithm, seed = space.search.algorithm, space.search.seed
    warm = staged.warm if staged else staging.WarmStart()
    if space.search.uses_optuna:
        from ray.tune.search import ConcurrencyLimiter

        from search.optuna_search import ObjectiveSearch, StudyMirror, new_study

        study = new_study(space)
        study.add_trials(staging.warm_trials(space, warm))
        mirror = StudyMirror(settings_file, space, fresh=True) if settings_file else None
        searcher = ObjectiveSearch(space, study=study, mirror=mirror)
        limited = ConcurrencyLimiter(searcher, max_concurrent=space.budget.max_concurrent)
        return (GatedSearcher(gate, limited) if gate else limited), {}, space.budget.trials
    # Tune ignores TuneConfig.max_concurrent_trials for a variant generator: it takes the limit itself.
    grid = staged.grid if staged else None
    if grid is not None:  # the points left, each preset whole over the grid (one sample each, nothing more)
        return (_variants(gate, points_to_evaluate=grid, max_concurrent=space.budget.max_concurrent),
                space.tune_param_space(), len(grid))
    generator = _variants(gate, random_state=seed, max_concurrent=space.budget.max_concurrent)
    samples = 1 if algorithm == "grid" else space.budget.trials
    return generator, space.tune_param_space(), samples


def _variants(gate: LaunchGate | None, **generator: Any) -> BasicVariantGenerator:
    return GatedVariants(gate, **generator) if gate else BasicVariantGenerator(**generator)


def epochs_to_first_rung(space: Space) -> int:
    """The epochs a new trial must be able to train before the budget's end to start: to ASHA's first rung, or
    every epoch without ASHA."""
    return space.scheduler.grace_epochs if space.scheduler.type == "asha" else space.budget.epochs


def make_scheduler(space: Space) -> TrialScheduler:
    if space.scheduler.type == "none":
        return FIFOScheduler()
    # The metric with its ties broken (search/rung.py): Ray goes on with every trial tied at a rung's cutoff.
    # Ray's rule, and a promotion made on a partly filled rung taken back once later arrivals outrank it.
    return RecheckedASHA(time_attr=EPOCH, metric=RUNG_SCORE, mode=space.mode, max_t=space.budget.epochs,
                         grace_period=space.scheduler.grace_epochs,
                         reduction_factor=space.scheduler.reduction_factor)


def connect_ray(address: str | None) -> None:
    """Joins the given cluster, the cluster of the Ray job we run in, or starts Ray in this process.

    Raises:
        RayUnreachable: an address (``--address`` or ``RAY_ADDRESS``) whose cluster does not answer within
            :data:`RAY_CONNECT_TIMEOUT_S`: ``ray.init`` would wait for it for many minutes without a word.
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        _check_ray_answers(address)
        ray.init(address=address, log_to_driver=False)
        return
    # "local": a private instance, never the cluster that `ray start` last recorded on this machine. Its workers
    # inherit the environment it starts with: CPU trials see no GPU.
    seconds = float(os.environ.get(RAY_START_TIMEOUT_VARIABLE, DEFAULT_RAY_START_TIMEOUT_S))
    hung = RayStartHung(f"Ray's local start did not finish within {seconds:g} s (Ray's logs: session_latest/logs "
                        f"in its temp folder, /tmp/ray by default); start the search again, and on a machine that "
                        f"slow set {RAY_START_TIMEOUT_VARIABLE} higher")
    with _environment_defaults({HIDE_UNASSIGNED_GPUS: "1"}), _deadline(seconds, hung):
        ray.init(address="local", include_dashboard=False, log_to_driver=False)


def quiet_tune_console() -> None:
    """Keeps Tune's and Optuna's info lines (result files written, study created) off the user's screen, as Ray
    does for RLlib: dettune's ConsoleCallback says what matters; their warnings and errors still show."""
    import optuna

    logging.getLogger("ray.tune").setLevel(logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not its logger's level: Optuna resets that on first use


@contextmanager
def _environment_defaults(values: dict[str, str]) -> Iterator[None]:
    """Sets the environment variables the user has not set for the block's duration, then removes them again:
    a chain runs its searches in one process, and a library user's process goes on after a search."""
    added = {key: value for key, value in values.items() if key not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


@contextmanager
def _deadline(seconds: float, error: Exception) -> Iterator[None]:
    """Raises ``error`` in the block once ``seconds`` have passed, without it a hung ``ray.init`` waits forever.

    A signal, because only the main thread can be interrupted where ``ray.init`` waits (a read of a child's
    pipe, a sleep); elsewhere, or while the process has its own timer set, the block runs without a deadline.
    The processes the start spawned share the driver's fate: they end when it exits.
    """
    if threading.current_thread() is not threading.main_thread() or signal.getitimer(signal.ITIMER_REAL)[0]:
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise error

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _check_ray_answers(address: str) -> None:
    """Connects to the GCS (or Ray client server) port the address names, or the one ``auto`` resolves to."""
    resolved = _auto_address() if address == "auto" else address
    host, _, port = (resolved or "").split("://")[-1].rpartition(":")
    fix = ("start it (`ray start --head`), fix --address / RAY_ADDRESS, or leave both unset to run Ray in this "
           "process")
    if not (host and port.isdigit()):
        raise RayUnreachable(f"no Ray cluster found for address {address!r}: {fix}")
    try:
        socket.create_connection((host, int(port)), timeout=RAY_CONNECT_TIMEOUT_S).close()
    except OSError as error:
        shown = address if resolved == address else f"{address!r} ({resolved}, as Ray last recorded it)"
        raise RayUnreachable(f"the Ray cluster at {shown} does not answer ({error}): {fix}") from None


def _auto_address() -> str | None:
    """The cluster ``ray.init(address="auto")`` would join (``RAY_ADDRESS``, or the one ``ray start`` last
    recorded on this machine), or None.

    Ray resolves ``auto`` inside ``ray.init`` only and has no public function for it; this is the one call of a
    private Ray API, and tests/search/test_connect.py fails if Ray changes it.
    """
    from ray._private.services import get_ray_address_from_environment

    try:
        return str(get_ray_address_from_environment("auto", None))
    except ConnectionError:
        return None


def resume_options(name: str, storage: str | Path, tracking_uri: str | None = None,
                   tracking_timeout_s: float | None = None, study_storage: str | None = None, *,
                   hours: float | None = None) -> SearchOptions:
    """The options that continue search ``name``: its saved effective space and tracking settings, where the
    command line does not change them."""
    experiment_dir = open_storage(storage) / name
    saved = experiment_dir / SAVED_OPTIONS
    if not saved.exists():
        raise NotFound(f"no search named {name} in {storage}: check the name and --storage "
                       f"(searches there: {', '.join(_searches(experiment_dir.parent)) or 'none'})")
    recorded = TrackingSettings.load(saved)
    return SearchOptions(space_file=_on_disk(experiment_dir / SAVED_SPACE, experiment_dir), name=name,
                         storage=storage,
                         tracking_uri=tracking_uri or recorded.uri,
                         tracking_timeout_s=tracking_timeout_s or recorded.down_timeout_s,
                         study_storage=study_storage or recorded.study_uri, hours=hours, resume=True)


def _searches(storage: Storage) -> list[str]:
    return sorted(path.split("/")[0] for path in storage.files() if path.count("/") == 1
                  and path.endswith(f"/{SAVED_OPTIONS}"))


def _on_disk(file: Storage, experiment_dir: Storage) -> Path:
    """A file of the search as a local file: itself, or a copy of it beside the trials' local folders."""
    if file.is_local:
        return file.local_path
    copy = experiment_dir.local_root() / file.name
    copy.parent.mkdir(parents=True, exist_ok=True)
    copy.write_text(file.read_text() or "")
    return copy


def run_search(options: SearchOptions, *, train: TrialFunction = tune_trial) -> SearchOutcome:
    """Runs (or resumes) a search to its end and returns where its results are.

    ``train`` is the Tune function each trial runs; only a benchmark's stand-in for training replaces it.
    A time budget (``budget.hours``) counts from this call.
    """
    started = time.time()
    storage = open_storage(options.storage)
    settings = TrackingSettings(uri=use_credentials(options.tracking_uri) if options.tracking_uri else None,
                                down_timeout_s=options.tracking_timeout_s,
                                study_uri=use_database_credentials(options.study_storage)
                                if options.study_storage else None)
    tracking_uri = tracking_uri_for(storage, settings.uri)
    check_reachable(tracking_uri)
    staged = staging.stage_from_store(load_for_search(options), tracking_uri)
    space = staged.space  # inherited knobs are fixed in it, and saved so: a resume keeps them
    validation = _check_then_start_ray(space, options)  # all of the input is checked before anything is written
    cleaned = validation.cleaned
    experiment_dir = storage / space.name
    _claim(experiment_dir, resume=options.resume, overwrite=options.overwrite)
    # data.on_bad: skip: the trials read the cleaned copy (a local file), the user's files stay as they are
    local_dir = experiment_dir.local_root()  # the trials' local files, the cleaned data, the time budget
    cleaned_dir = local_dir / CLEANED_DATA
    if cleaned is not None:
        space = with_cleaned_files(space, cleaned.paths(cleaned_dir))
    plan = make_plan(space, storage)
    quiet_tune_console()
    with _environment_defaults(SEARCH_ENVIRONMENT), _quiet_trial_errors():
        check_cluster(plan)  # before anything is written: a trial that can never be placed would wait forever
        _save(experiment_dir, space, options.space_file, settings)
        start_clock(local_dir, space.budget.hours, started=started)
        if cleaned is not None:
            cleaned.write(cleaned_dir)
        tracker = settings.tracker(storage, space.name, fresh=options.overwrite)
        tracker.describe_search(tags={**_search_tags(space), **staging.tags(staged),
                                      **_budget_tags(local_dir), TAG_STORAGE: str(experiment_dir)},
                                space_yaml=(experiment_dir / SAVED_SPACE_FILE).read_text() or "",
                                space_json=json.dumps(space.to_json(), indent=2))
        tracker.save_runs_view(space.metric, space.mode)
        _log_data(tracker, validation)
        restorable = options.resume and tune.Tuner.can_restore(str(experiment_dir))
        # The study copy's default, optuna.db, is SQLite beside a local storage; an object store needs --study-storage.
        study_copy = storage.is_local or settings.study_uri is not None
        tuner = _tuner(staged, plan, tracker, storage, resume=restorable, train=train, study_copy=study_copy)
        if restorable:  # what a killed or stopped driver had not delivered goes out now, not at the search's end
            # With a tracker of its own: the restored callbacks write through theirs, and reconcile must read
            # the runs afresh, not from what this one saw before they wrote.
            catching_up = settings.tracker(storage, space.name)
            deliver_points(tuner.get_results(), plan, catching_up, catching_up.runs_by_trial())
        results = tuner.fit()
        reconcile(results, space, plan, tracker)
        best_id = _record_best(results, space, plan, tracker)
        runs = tracker.trial_runs()  # read once, with the ends, stops and Pareto tags written above
        budget_end = _budget_end(local_dir, runs)
        if budget_end is not None:
            tracker.client.set_tag(tracker.parent_run_id, TAG_ENDED_BECAUSE, budget_end)
        tracker.finish_search()
        return SearchOutcome(name=space.name, tracking_uri=tracker.tracking_uri, experiment_id=tracker.experiment_id,
                             experiment_dir=experiment_dir.local_path if storage.is_local else str(experiment_dir),
                             best_trial_id=best_id, table=results_table(runs, space, results),
                             finished=finished_trials(runs), stopped_because=_stopped_because(results, space, plan),
                             budget_end=budget_end)


def _budget_tags(experiment_dir: Path) -> dict[str, str]:
    """The parent's record of this driver's time budget (a tag: a resume may change it, a param could not)."""
    budget = TimeBudget(experiment_dir)
    if budget.hours is None or budget.ends_at is None:
        return {}
    return {TAG_BUDGET: f"{budget.hours:g} h, this driver from {_utc(budget.record()['started'])} "
                        f"to {_utc(budget.ends_at)}"}


def _utc(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seconds))


def _budget_end(experiment_dir: Path, runs: list[Run]) -> str | None:
    """With a time budget, how the search ended against it: reached (how many trials finished, how many more the
    budget stopped, and when and why no more started), or within it. None without a budget."""
    budget = TimeBudget(experiment_dir)
    if budget.hours is None:
        return None
    at_budget = sum(run.data.tags.get(TAG_STOPPED_BY) == STOPPED_BY_BUDGET for run in runs)
    closed = closed_because(experiment_dir)
    if closed is None and at_budget == 0:
        return f"ended within the budget of {budget.hours:g} h"
    finished = finished_trials(runs) - at_budget
    reason = f"; no trial started after {_utc(closed[0])}: {closed[1]}" if closed else ""
    return (f"budget of {budget.hours:g} h reached: {finished} trial{'s' * (finished != 1)} finished, "
            f"{at_budget} stopped at the budget{reason}")


def _log_data(tracker: Tracker, validation: Validation) -> None:
    """The card of the data the trials read and, with ``on_bad: skip``, what was left out: on the parent run."""
    check, cleaned = validation.data_check, validation.cleaned
    if check is None:
        return
    card = DatasetCard.of(cleaned.docs, check.classes) if cleaned is not None else check.dataset_card
    tracker.client.log_text(tracker.parent_run_id, json.dumps(card.to_json(), indent=1), CARD_FILE)
    if cleaned is not None:
        tracker.client.set_tag(tracker.parent_run_id, TAG_LEFT_OUT, cleaned.summary())
        tracker.client.log_text(tracker.parent_run_id, cleaned.report(), LEFT_OUT_FILE)


def _check_then_start_ray(space: Space, options: SearchOptions) -> Validation:
    """Checks the space, then starts (or joins) Ray: a refused space starts nothing.

    Never both at once: Ray forks its processes with a ``preexec_fn``, which Python documents as unsafe while
    other threads run (the child can deadlock before its exec). Run beside the check's thread (importing,
    loading libraries, training a step), a search's start hung twice in three full test runs, its raylet never
    started. Overlapping the two saved 0.44 s per search.
    """
    validation = check_space(space, str(options.space_file), first_step=first_step)
    connect_ray(options.address)
    return validation


class _DropIncompleteTrials(logging.Filter):
    """Tune's closing "Trials did not complete: [...]": the search prints its own line per failed trial."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Trials did not complete")


@contextmanager
def _quiet_trial_errors() -> Iterator[None]:
    """Keeps Tune's closing list of failed trials off the console; each failure's line names its traceback file."""
    tune_logger = logging.getLogger("ray.tune.tune")
    drop = _DropIncompleteTrials()
    tune_logger.addFilter(drop)
    try:
        yield
    finally:
        tune_logger.removeFilter(drop)


def setup_stop_limit(space: Space) -> int:
    """How many trials must fail at setup the same way before the search stops (fewer if it has fewer)."""
    total = space.grid_size() if space.search.algorithm == "grid" else space.budget.trials
    return min(SETUP_FAILURES_TO_STOP, total or SETUP_FAILURES_TO_STOP)


def _stopped_because(results: Any, space: Space, plan: TrialPlan) -> str | None:
    reported = any(_epochs_of(result) is not None for result in results)
    reason = repeated_setup_failure(plan.setup_failures(), any_reported=reported, limit=setup_stop_limit(space))
    if reason is None:
        return None
    return (f"the first {setup_stop_limit(space)} trials all failed at setup with the same error, which every "
            f"other trial would repeat: {reason}")


def finished_trials(runs: list[Run]) -> int:
    """Of a search's trial runs, those that trained and ended normally: completed, or stopped (by ASHA or the time
    budget) after an epoch."""
    statuses = [(run.data.tags.get(TAG_STATUS), run.data.tags.get(TAG_STOPPED_AT)) for run in runs]
    return sum(1 for status, at in statuses if status == "completed" or (status == "stopped" and at not in (None, "0")))


def _save(experiment_dir: Storage, space: Space, space_file: Path, settings: TrackingSettings) -> None:
    """Writes what a resume needs: the effective space, the space file as written (kept from the first run), and
    the tracking settings."""
    original = experiment_dir / SAVED_SPACE_FILE
    if not original.exists():  # a resume starts from space.json; the file the user wrote stays as it was
        original.write_text(space_file.read_text())
    (experiment_dir / SAVED_SPACE).write_text(json.dumps(space.to_json(), indent=2))
    settings.save(experiment_dir / SAVED_OPTIONS)


def _claim(experiment_dir: Storage, *, resume: bool, overwrite: bool) -> None:
    exists = experiment_dir.exists()
    if exists and not (resume or overwrite):
        raise SearchExists(f"a search named {experiment_dir.name} already exists in {experiment_dir.parent}: "
                           "continue it with `dettune resume NAME`, pass --overwrite to start again, "
                           "or choose another --name")
    if overwrite:
        if exists:
            experiment_dir.delete()
        shutil.rmtree(experiment_dir.local_root(), ignore_errors=True)  # a URI's trials' local folders


def _tuner(staged: staging.Staging, plan: TrialPlan, tracker: Tracker, storage: Storage, *, resume: bool,
           train: TrialFunction, study_copy: bool) -> tune.Tuner:
    space = staged.space
    trainable = tune.with_resources(tune.with_parameters(train, plan=plan), trial_resources(plan))
    if resume:
        return tune.Tuner.restore(str(storage / space.name), trainable=trainable, resume_errored=True)
    settings_file = storage / space.name / SAVED_OPTIONS
    budget = TimeBudget((storage / space.name).local_root())  # a restored copy reads the resume's budget file
    searcher, param_space, samples = make_searcher(space, staged, settings_file=settings_file if study_copy else None,
                                                   gate=LaunchGate(budget, epochs_to_rung=epochs_to_first_rung(space)))
    epochs = space.budget.epochs
    callbacks = [MlflowCallback(tracker, settings_file=settings_file, params_of=plan.run_params,
                                max_epochs=epochs, failure_of=plan.failure_of, budget=budget),
                 ConsoleCallback(metric=space.metric, max_epochs=epochs, params_of=plan.point,
                                 failure_of=plan.failure_of, log_of=plan.trial_log, budget=budget,
                                 data_check=check_command(plan.data_root, space.data.train, space.data.val,
                                                          space.data.images)),
                 JsonLoggerCallback(), CSVLoggerCallback()]
    return tune.Tuner(
        trainable,
        param_space=param_space,
        # A finished trial's process runs the next one: imports, Ray worker and caches stay warm (run_trial
        # releases mmengine's per-trial globals, so nothing of one trial reaches the next).
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=make_scheduler(space), num_samples=samples,
                                    reuse_actors=True),
        run_config=tune.RunConfig(
            name=space.name, storage_path=str(storage), callbacks=callbacks, verbose=0,
            stop=CombinedStopper(RepeatedSetupFailureStopper(plan.setup_failures, limit=setup_stop_limit(space)),
                                 BudgetStopper(budget)),
            failure_config=tune.FailureConfig(max_failures=space.budget.max_retries),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=KEPT_REPORTED_CHECKPOINTS,
                                                    checkpoint_score_attribute=space.metric,
                                                    checkpoint_score_order=space.mode)),
    )


def _search_tags(space: Space) -> dict[str, str]:
    tags = {
        "dettune.space": space.name,
        "dettune.searcher": json.dumps(space.search.model_dump()),
        "dettune.scheduler": json.dumps(space.scheduler.model_dump()),
        "dettune.metric": f"{space.metric} ({space.mode})",
        "dettune.base": space.base,
    }
    commit = _git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def _git_commit() -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=Path(__file__).parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def reconcile(results: Any, space: Space, plan: TrialPlan, tracker: Tracker) -> None:
    """Makes MLflow hold exactly what Ray holds: every trial's run, every reported epoch, how it ended.

    The live callback writes as results arrive; this pass (idempotent, each point still written once)
    fills whatever a killed driver or an unreachable tracking server left out.
    """
    listed = tracker.runs_by_trial()  # nothing else writes now: one listing serves every trial
    deliver_points(results, plan, tracker, listed)
    for result in results:
        if _epochs_of(result) is None:  # no epoch reported: the live callbacks recorded how it ended
            continue
        history = result.metrics_dataframe
        trial_id = _trial_id(result)
        failure = plan.failure_of(trial_id) or (failure_reason_of(result.error) if result.error else None)
        epochs = int(history[EPOCH].max())
        if failure is not None:
            tracker.end_trial(trial_id, status="failed", failure=failure, only_if_open=True)
        elif epochs < space.budget.epochs:
            tracker.end_trial(trial_id, status="stopped", stopped_at=epochs, only_if_open=True)
        else:
            tracker.end_trial(trial_id, status="completed", only_if_open=True)
    _end_lost_trials(results, tracker, listed)


def _end_lost_trials(results: Any, tracker: Tracker, listed: dict[str, Run]) -> None:
    """Ends the open runs of trials Tune does not know: a driver killed just after it started a trial, before
    Tune's snapshot held it, leaves the trial's run open, and the resumed search never hears of the trial again."""
    known = {str(result.metrics.get(TRIAL_ID)) for result in results}  # Tune fills it in even before a report
    for trial_id, run in listed.items():  # the loop above ends known trials only: their status is as listed
        if trial_id not in known and run.data.tags.get(TAG_STATUS) == "running":
            tracker.start_trial(trial_id, {}, listed={trial_id: run})
            tracker.end_trial(trial_id, status="failed", failure=LOST_TRIAL)


def deliver_points(results: Any, plan: TrialPlan, tracker: Tracker, listed: dict[str, Run]) -> None:
    """Writes every epoch Ray holds of each trial that MLflow lacks (each point once), without ending a run.

    Called while no callback writes (before or after Tune's loop), so ``listed``, the search's runs read at once
    (:meth:`Tracker.runs_by_trial`), stands for a search per trial, and one history per run (of a key every row of
    the trial has) tells which epochs it holds.
    """
    for result in results:
        if _epochs_of(result) is None:
            continue
        trial_id = _trial_id(result)
        rows = [{k: v for k, v in row.items() if not _is_nan(v)} for row in result.metrics_dataframe.to_dict("records")]
        numbers = [{k for k, v in row.items() if isinstance(v, int | float)} for row in rows]  # what log_epoch writes
        tracker.start_trial(trial_id, plan.run_params(result.config), listed=listed,
                            every_row_has=set.intersection(*numbers))
        for row in rows:
            tracker.log_epoch(trial_id, row)


def _epochs_of(result: Any) -> Any:
    """The trial's reported epochs (a DataFrame), or None if it reported none."""
    history = result.metrics_dataframe
    if history is None or EPOCH not in history:
        return None
    history = history[history[EPOCH].notna()]
    return None if history.empty else history


def _is_nan(value: Any) -> bool:
    return isinstance(value, float) and value != value


def _record_best(results: Any, space: Space, plan: TrialPlan, tracker: Tracker) -> str | None:
    """Gives the parent run the best feasible trial; with objectives, tags the Pareto front's runs."""
    finished = {_trial_id(r): r for r in results if _has_history(r) and not r.error
                and plan.failure_of(_trial_id(r)) is None}
    values = {trial_id: trial_values(_rows(r), primary=space.metric, mode=space.mode)
              for trial_id, r in finished.items()}
    if space.objectives:
        tracker.mark_pareto(feasible_front(values, directions=space.directions(), constraints=space.constraints))
    trial_id = best_trial(values, metric=space.metric, mode=space.mode, constraints=space.constraints)
    if trial_id is None:  # no trial reported the metric, or none met the limits
        return None
    best = finished[trial_id]
    history = best.metrics_dataframe
    row = history.loc[history[space.metric].idxmax() if space.mode == "max" else history[space.metric].idxmin()]
    tracker.record_best(plan.point(best.config), row.dropna().to_dict(), epoch=int(row[EPOCH]), trial_id=trial_id)
    return trial_id


def _has_history(result: Any) -> bool:
    return result.metrics_dataframe is not None and not result.metrics_dataframe.empty


def _rows(result: Any) -> list[dict[str, float]]:
    """The trial's reported metrics per epoch (the dataframe fills a metric missing from an epoch with NaN)."""
    return [{k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and not _is_nan(v)}
            for row in result.metrics_dataframe.to_dict("records")]


def _trial_id(result: Any) -> str:
    return str(result.metrics_dataframe[TRIAL_ID].iloc[-1])


def results_table(runs: list[Run], space: Space, results: Any) -> str:
    """The end-of-search summary: one line per trial run of the search (``runs``, read back from MLflow), its score
    at its best epoch; with objectives, each one's last measurement and a ``*`` on the trials of the Pareto front.

    Runs, knobs, status and objectives come from that one listing; the best score and the epochs
    come from Ray's results, which :func:`reconcile` has just made MLflow hold (two metric-history requests per
    trial were 27 ms of the search's end per trial on a tracking server).
    """
    histories = {_trial_id(r): h for r in results if (h := _epochs_of(r)) is not None}
    knobs = list(space.space)
    others = [metric for metric, _ in space.directions() if metric != space.metric]
    header = ["trial", *knobs, "epochs", space.metric, *others, *(["pareto"] if space.objectives else []), "status"]
    lines = [header]
    for run in runs:
        tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
        stopped_at = tags.get(TAG_STOPPED_AT)
        status = outcome_text(tags.get(TAG_STATUS, "?"), stopped_at=int(stopped_at) if stopped_at else None,
                              failure=tags.get(TAG_FAILURE), stopped_by=tags.get(TAG_STOPPED_BY))
        history = histories.get(tags.get(TAG_TRIAL, ""))
        scores = [] if history is None or space.metric not in history else list(history[space.metric].dropna())
        best = (max if space.mode == "max" else min)(scores) if scores else None
        epochs = 0 if history is None else int(history[EPOCH].max())
        lines.append([tags.get(TAG_EXP_NUM, "?"), *(show_value(params.get(k, "-")) for k in knobs), str(epochs),
                      *(_cell(value) for value in (best, *(metrics.get(metric) for metric in others))),
                      *(["*" if tags.get(TAG_PARETO) == "true" else ""] if space.objectives else []), status])
    widths = [max(len(str(row[i])) for row in lines) for i in range(len(header))]
    return "\n".join("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)) for row in lines)


def _cell(value: float | None) -> str:
    return f"{value:.3g}" if value is not None else "-"
