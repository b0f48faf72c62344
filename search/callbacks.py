"""Ray Tune callbacks on the driver: MLflow bookkeeping and one console line per trial event.

Both run in the driver process, after Tune has processed a result (its checkpoint is already in storage), so
only one process ever writes to MLflow.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ray.tune import Callback, Stopper

from search.budget import TimeBudget
from search.tracking import Tracker, TrackingSettings, now_ms
from search.trainable import DATA_ERROR
from search.writer import OrderedWriter
from spaces.knobs import show_value
from tracking_names import STOPPED_BY_BUDGET, outcome_text
from tracking_names.storage import Storage
from trainers.metrics import EPOCH

FailureOf = Callable[[str], "str | None"]
"""Reads the reason a trial ended itself as failed (diverged, out of memory), or None."""


def trial_outcome(trial: Any, max_epochs: int, failure: str | None) -> tuple[str, int | None]:
    """How a trial that ended without a Ray error ended: completed, failed, or stopped at an epoch.

    A trial that diverged ends itself (a retry would diverge again) and leaves its reason behind. Otherwise
    ASHA or the time budget ends a healthy trial before its last epoch (:func:`stopped_by` tells which).
    """
    epoch = int((trial.last_result or {}).get(EPOCH, 0))
    if failure is not None:
        return "failed", None
    return ("completed", None) if epoch >= max_epochs else ("stopped", epoch)


def stopped_by(status: str, stopped_at: int | None, budget: TimeBudget) -> str | None:
    """:data:`STOPPED_BY_BUDGET` for a trial that stopped early after the budget's end, else None (ASHA).

    Past the end Tune asks the budget's stopper before the scheduler, so every trial stopped then is the budget's.
    """
    return STOPPED_BY_BUDGET if status == "stopped" and stopped_at and budget.ended() else None


def failure_reason(trial: Any) -> str:
    """The last line of the trial's error (the exception message), or a generic reason."""
    return failure_reason_of(trial.get_error())


def failure_reason_of(error: BaseException | None) -> str:
    text = str(error).strip() if error is not None else ""
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "trial failed (see its trial.log and Ray's error file)"


class TrackingDown(RuntimeError):
    """The tracking server stayed unreachable past the allowed time; the search stops to be resumed later."""


class MlflowCallback(Callback):
    """Keeps each Tune trial in one MLflow run, whatever restarts happen around it.

    Writes go out in order on a thread of their own (:class:`~search.writer.OrderedWriter`): Tune's loop hands them
    over and goes on, never waiting for the server. While the tracking server is unreachable, training goes on and
    the writes wait; they are delivered in order once it answers again. If it stays down longer than the settings'
    ``down_timeout_s``, :class:`TrackingDown` stops the search (Ray keeps every result and checkpoint, and
    ``dettune resume`` later delivers what is missing).

    Tune pickles callbacks with its experiment state; this one pickles the path of the search's saved
    :class:`~search.tracking.TrackingSettings` instead of its tracker, and a restored copy rebuilds the tracker from
    that file, which the resuming driver has just written: a new ``--tracking-uri`` or ``--tracking-timeout``
    reaches it, and no tracking URI is pickled.
    """

    def __init__(self, tracker: Tracker, *, settings_file: Path | Storage,
                 params_of: Callable[[Mapping[str, Any]], dict[str, Any]], max_epochs: int, failure_of: FailureOf,
                 budget: TimeBudget, retry_every_s: float = 5.0) -> None:
        self._settings_file = settings_file
        self._budget = budget
        self._tracker = tracker
        self._down_timeout_s = TrackingSettings.load(settings_file).down_timeout_s
        self._params_of = params_of
        self._max_epochs = max_epochs
        self._failure_of = failure_of
        self._retry_every_s = retry_every_s
        self._writer = OrderedWriter(retry_every_s)
        self._open: set[str] = set()  # started, end not yet recorded

    def __getstate__(self) -> dict[str, Any]:
        """The writes still waiting are left out: a resumed driver rebuilds them from Ray's results (``reconcile``)."""
        state = dict(self.__dict__)
        del state["_tracker"], state["_down_timeout_s"], state["_writer"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        settings = TrackingSettings.load(self._settings_file)
        experiment_dir = self._settings_file.parent
        self._tracker = settings.tracker(experiment_dir.parent, experiment_dir.name)
        self._down_timeout_s = settings.down_timeout_s
        self._writer = OrderedWriter(self._retry_every_s)

    def _send(self, *writes: Callable[[], Any]) -> None:
        self._writer.put(*writes)

    def on_step_end(self, iteration: int, trials: list[Any], **info: Any) -> None:
        if self._writer.down_for() > self._down_timeout_s:
            raise TrackingDown(f"MLflow at {self._tracker.tracking_uri} has been unreachable for more than "
                               f"{self._down_timeout_s:.0f} s, so the search stopped; training results are kept "
                               f"in Ray storage: run `dettune resume {self._tracker.search}` once it is back")

    def _start(self, trial: Any) -> Callable[[], Any]:
        params = self._params_of(trial.config)
        return lambda: self._tracker.start_trial(trial.trial_id, params)

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._open.add(trial.trial_id)
        self._send(self._start(trial))

    def on_trial_result(self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any],
                        **info: Any) -> None:
        # Stamped as it is buffered: a retry of a write the server committed (its reply lost) is then identical.
        row, stamp = dict(result), now_ms()
        self._send(self._start(trial), lambda: self._tracker.log_epoch(trial.trial_id, row, stamp_ms=stamp))

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._open.discard(trial.trial_id)
        failure = self._failure_of(trial.trial_id)
        status, stopped_at = trial_outcome(trial, self._max_epochs, failure)
        by = stopped_by(status, stopped_at, self._budget)
        self._send(self._start(trial), lambda: self._tracker.end_trial(
            trial.trial_id, status=status, stopped_at=stopped_at, failure=failure, stopped_by=by))

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._open.discard(trial.trial_id)
        reason = failure_reason(trial)
        self._send(self._start(trial),
                   lambda: self._tracker.end_trial(trial.trial_id, status="failed", failure=reason))

    def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
        """Records how the trials still open ended, then waits for every write to land, as long as an outage
        stays within the allowed time."""
        for trial in trials:  # Tune reports no end for a trial the search stopped (e.g. after setup failures)
            if trial.trial_id in self._open:
                self.on_trial_complete(0, trials, trial)
        while not self._writer.wait_delivered(timeout_s=1.0):
            if self._writer.down_for() > self._down_timeout_s:
                raise TrackingDown(f"MLflow at {self._tracker.tracking_uri} has been unreachable for more than "
                                   f"{self._down_timeout_s:.0f} s at the end of the search: run "
                                   f"`dettune resume {self._tracker.search}` once it is back")


class ConsoleCallback(Callback):
    """Prints one line per trial event (started, epoch result, stopped by ASHA, completed, failed) and,
    every ``table_every_s`` seconds while trials run, a status table. A failure's line names the file with
    its traceback, which is never printed itself. It holds no stream: Tune pickles callbacks with the
    experiment state, so stdout is looked up at each print."""

    def __init__(self, *, metric: str, max_epochs: int, params_of: Callable[[Mapping[str, Any]], dict[str, Any]],
                 failure_of: FailureOf, log_of: Callable[[str], Path], budget: TimeBudget,
                 data_check: str = "dettune data check", table_every_s: float = 60.0) -> None:
        self._failure_of = failure_of
        self._budget = budget
        self._data_check = data_check  # the command that lists every bad file of the search's dataset
        self._told_data_check = False
        self._log_of = log_of
        self._open: set[str] = set()  # started, end not yet printed
        self._metric = metric
        self._max_epochs = max_epochs
        self._params_of = params_of
        self._table_every_s = table_every_s
        self._last_table = time.monotonic()

    def on_step_end(self, iteration: int, trials: list[Any], **info: Any) -> None:
        if time.monotonic() - self._last_table < self._table_every_s:
            return
        self._last_table = time.monotonic()
        lines = [f"{'trial':<10} {'status':<11} {'epoch':>5} {self._metric:>14}"]
        for trial in trials:
            result = trial.last_result or {}
            value = result.get(self._metric)
            lines.append(f"{trial.trial_id:<10} {trial.status:<11} {int(result.get(EPOCH, 0)):>5} "
                         f"{value if isinstance(value, float) else '-':>14.14}")
        print("\n".join(["", *lines, ""]), flush=True)

    def _say(self, trial: Any, text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] trial {trial.trial_id}: {text}", flush=True)

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._open.add(trial.trial_id)
        knobs = " ".join(f"{k}={show_value(v)}" for k, v in self._params_of(trial.config).items())
        self._say(trial, f"started {knobs}")

    def on_trial_result(self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any],
                        **info: Any) -> None:
        value = result.get(self._metric)
        shown = f"{value:.4f}" if isinstance(value, float) else "-"
        self._say(trial, f"epoch {int(result[EPOCH])}/{self._max_epochs} {self._metric}={shown}")

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._open.discard(trial.trial_id)
        failure = self._failure_of(trial.trial_id)
        status, stopped_at = trial_outcome(trial, self._max_epochs, failure)
        text = outcome_text(status, stopped_at=stopped_at, failure=failure,
                            stopped_by=stopped_by(status, stopped_at, self._budget))
        if status == "failed":
            text = f"{text} (not retried); traceback in {self._log_of(trial.trial_id)}"
        self._say(trial, text)
        if failure is not None and failure.startswith(DATA_ERROR) and not self._told_data_check:
            self._told_data_check = True
            print(f"a sample could not be read: `{self._data_check}` checks every image and box at once; fix "
                  "what it lists, then start the search again", flush=True)

    def on_trial_recover(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        attempt = trial.run_metadata.num_failures + 1
        epoch = int((trial.last_result or {}).get(EPOCH, 0))
        start = f"from its epoch {epoch} checkpoint" if epoch else "from the start (no epoch finished)"
        self._say(trial, f"retried, attempt {attempt} of {trial.max_failures + 1}, {start}, after: "
                         f"{failure_reason(trial)}; traceback in {trial.error_file}")

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._open.discard(trial.trial_id)
        retries = trial.run_metadata.num_failures - 1
        tried = f" after {retries} {'retry' if retries == 1 else 'retries'}" if retries > 0 else ""
        self._say(trial, f"failed{tried}: {failure_reason(trial)}; traceback in {trial.error_file}")

    def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
        for trial in trials:  # Tune reports no end for a trial the search stopped (e.g. after setup failures)
            if trial.trial_id in self._open:
                self.on_trial_complete(0, trials, trial)


SETUP_FAILURES_TO_STOP = 3


def repeated_setup_failure(failures: Mapping[str, str], *, any_reported: bool, limit: int) -> str | None:
    """The reason shared by ``limit`` trials that failed at setup while no trial had reported, else None.

    Setup failures (config, file, import, shape) repeat for every point of the space, so once the first
    trials all failed the same way the rest of the budget would only repeat it.
    """
    reasons = set(failures.values())
    if any_reported or len(failures) < limit or len(reasons) != 1:
        return None
    return reasons.pop()


class RepeatedSetupFailureStopper(Stopper):
    """Stops the whole search once :func:`repeated_setup_failure` finds one reason for its first trials."""

    def __init__(self, setup_failures: Callable[[], Mapping[str, str]], *, limit: int) -> None:
        self._setup_failures = setup_failures
        self._limit = limit
        self._any_reported = False

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        # Tune also hands over a last result, without metrics, when a trial function returns.
        self._any_reported = self._any_reported or EPOCH in result
        return False

    def stop_all(self) -> bool:
        if self._any_reported:  # a trial that trained once proves the space can train: never stop early
            return False
        found = repeated_setup_failure(self._setup_failures(), any_reported=False, limit=self._limit)
        return found is not None
