"""A search's time budget (``budget.hours``): when new trials stop starting, and when running ones stop.

The end is counted from the moment a driver starts, ``dettune search`` or ``dettune resume`` alike:
:func:`start_clock` writes it to the search's local folder (its Ray directory, or for an object store its
folder in the user's cache), and the objects Tune pickles with the experiment read it
from there, so a resumed driver's end reaches the searcher and stopper that Tune restores.

Starting: a new trial starts only while it could still reach its first rung (``scheduler.grace_epochs``, or every
``budget.epochs`` without ASHA) before the end, at the median seconds per epoch of every result so far (Tune's
``time_this_iter_s``: a trial's first epoch includes its start). Before the first result there is no estimate and
trials start as usual. Once closed, starting stays closed for the rest of that driver's run.

Ending: after the end, each running trial stops at the next epoch it reports (a Tune ``Stopper``), so that epoch is
reported, checkpointed and written to MLflow like any other; no trial is cut off mid-epoch. The search then ends as
usual: the end-of-search bookkeeping (``reconcile``, the best trial, the table) runs on everything that trained.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

from ray.tune import Stopper
from ray.tune.search import BasicVariantGenerator, SearchAlgorithm, SearchGenerator

from trainers.metrics import EPOCH

BUDGET_FILE = "budget.json"
"""In the search's Ray experiment directory: this driver's budget (hours, end) and whether starting closed."""
EPOCH_SECONDS = "time_this_iter_s"  # Tune's time between two reports of a trial, here one epoch


def start_clock(experiment_dir: Path, hours: float | None, *, started: float) -> None:
    """Records this driver's budget: ``hours`` from ``started`` (seconds since the epoch), or none."""
    ends_at = started + hours * 3600 if hours is not None else None
    experiment_dir.mkdir(parents=True, exist_ok=True)  # an object store's search: its folder in the user's cache
    (experiment_dir / BUDGET_FILE).write_text(json.dumps({"hours": hours, "started": started, "ends_at": ends_at}))


class TimeBudget:
    """The end this driver recorded, read once per process from the search's budget file."""

    def __init__(self, experiment_dir: Path) -> None:
        self._file = experiment_dir / BUDGET_FILE
        self._record: dict[str, Any] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"_file": self._file, "_record": None}  # a restored copy reads the resuming driver's file

    def record(self) -> dict[str, Any]:
        if self._record is None:
            self._record = json.loads(self._file.read_text()) if self._file.is_file() else {}
        return self._record

    @property
    def ends_at(self) -> float | None:
        value = self.record().get("ends_at")
        return float(value) if value is not None else None

    @property
    def hours(self) -> float | None:
        value = self.record().get("hours")
        return float(value) if value is not None else None

    def left_s(self) -> float | None:
        """Seconds to the end (negative once past it), or None without a budget."""
        ends_at = self.ends_at
        return ends_at - time.time() if ends_at is not None else None

    def ended(self) -> bool:
        left = self.left_s()
        return left is not None and left <= 0

    def note_closed(self, reason: str) -> None:
        """Records in the budget file that starting closed, when and why (read back by :func:`closed_because`)."""
        record = {**self.record(), "closed": reason, "closed_at": time.time()}
        self._file.write_text(json.dumps(record))
        self._record = record


def closed_because(experiment_dir: Path) -> tuple[float, str] | None:
    """When (seconds since the epoch) and why this driver stopped starting trials for the budget, or None."""
    path = experiment_dir / BUDGET_FILE
    record = json.loads(path.read_text()) if path.is_file() else {}
    return (float(record["closed_at"]), str(record["closed"])) if "closed" in record else None


class LaunchGate:
    """Whether a new trial may still start: see the module's docstring for the rule."""

    def __init__(self, budget: TimeBudget, *, epochs_to_rung: int) -> None:
        self._budget = budget
        self._epochs_to_rung = epochs_to_rung
        self._epoch_seconds: list[float] = []
        self._closed = False

    def __getstate__(self) -> dict[str, Any]:
        """A restored gate starts open and without estimates: its driver has its own budget."""
        return {**self.__dict__, "_epoch_seconds": [], "_closed": False}

    def observe(self, result: dict[str, Any]) -> None:
        if EPOCH in result and isinstance(result.get(EPOCH_SECONDS), (int, float)):
            self._epoch_seconds.append(float(result[EPOCH_SECONDS]))

    def closed(self) -> bool:
        if self._closed:
            return True
        left = self._budget.left_s()
        if left is None:
            return False
        needed = statistics.median(self._epoch_seconds) * self._epochs_to_rung if self._epoch_seconds else 0.0
        if left > needed and left > 0:
            return False
        self._closed = True
        reason = "the budget had run out" if left <= 0 else (
            f"a new trial would need {needed:.0f} s to reach epoch {self._epochs_to_rung} "
            f"({needed / self._epochs_to_rung:.1f} s per epoch, the median so far) and {left:.0f} s were left")
        self._budget.note_closed(reason)
        print(f"[{time.strftime('%H:%M:%S')}] time budget: no new trial starts: {reason}", flush=True)
        return True


class _Gated(SearchAlgorithm):
    """A Tune search algorithm that suggests nothing more once its :class:`LaunchGate` closes.

    It only reports itself finished: its own finished state (saved with the experiment) stays as it was, so a
    resumed search with time left goes on suggesting.
    """

    _gate: LaunchGate

    def next_trial(self) -> Any:
        return None if self._gate.closed() else super().next_trial()

    def is_finished(self) -> bool:
        return bool(self._gate.closed() or super().is_finished())

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        self._gate.observe(result)
        super().on_trial_result(trial_id, result)


class GatedVariants(_Gated, BasicVariantGenerator):
    """Tune's variant generator (random and grid search) behind a :class:`LaunchGate`."""

    def __init__(self, gate: LaunchGate, **generator: Any) -> None:
        super().__init__(**generator)
        self._gate = gate


class GatedSearcher(_Gated, SearchGenerator):
    """A Tune ``Searcher`` (dettune's Optuna searcher behind its concurrency limit) behind a :class:`LaunchGate`."""

    def __init__(self, gate: LaunchGate, searcher: Any) -> None:
        super().__init__(searcher)
        self._gate = gate


class BudgetStopper(Stopper):
    """Stops each trial at the first epoch it reports after the end; never the whole search at once."""

    def __init__(self, budget: TimeBudget) -> None:
        self._budget = budget

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        return self._budget.ended()

    def stop_all(self) -> bool:
        return False
