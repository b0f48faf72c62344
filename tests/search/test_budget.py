"""The time budget's rules, without Ray running: when the gate stops new trials, and what a restored copy reads.

Real searches under a budget are in test_search.py.
"""

from __future__ import annotations

import pickle
import time
from pathlib import Path

from search.budget import BudgetStopper, GatedVariants, LaunchGate, TimeBudget, closed_because, start_clock


def _epoch(seconds: float) -> dict[str, float]:
    return {"epoch": 1, "time_this_iter_s": seconds}


def test_without_hours_nothing_closes_or_stops(tmp_path: Path) -> None:
    start_clock(tmp_path, None, started=time.time() - 10**6)
    gate = LaunchGate(TimeBudget(tmp_path), epochs_to_rung=3)
    gate.observe(_epoch(10**6))
    assert not gate.closed() and not BudgetStopper(TimeBudget(tmp_path))("t", _epoch(1))


def test_the_gate_closes_when_a_new_trial_could_not_reach_its_rung(tmp_path: Path) -> None:
    start_clock(tmp_path, 1.0, started=time.time())  # 3600 s left
    gate = LaunchGate(TimeBudget(tmp_path), epochs_to_rung=3)
    assert not gate.closed(), "no estimate yet: the first trials start"
    for seconds in (100.0, 1000.0, 1100.0):  # median 1000 s: 3 epochs need 3000 s of the 3600 left
        gate.observe(_epoch(seconds))
    assert not gate.closed()
    gate.observe(_epoch(1300.0))
    gate.observe(_epoch(1300.0))  # median 1100 s: 3300 s, still inside
    assert not gate.closed()
    gate.observe(_epoch(1300.0))  # median 1200 s: 3600 s, no longer inside what is left
    assert gate.closed()
    when, why = closed_because(tmp_path) or (0.0, "")
    assert "a new trial would need 3600 s to reach epoch 3 (1200.0 s per epoch" in why and when <= time.time()


def test_a_result_without_an_epoch_is_not_an_estimate(tmp_path: Path) -> None:
    start_clock(tmp_path, 1.0, started=time.time())
    gate = LaunchGate(TimeBudget(tmp_path), epochs_to_rung=1)
    gate.observe({"time_this_iter_s": 10**6})  # Tune's last result when a trial function returns
    assert not gate.closed()


def test_after_the_end_the_gate_is_closed_and_every_trial_stops(tmp_path: Path) -> None:
    start_clock(tmp_path, 0.5, started=time.time() - 1801)
    assert LaunchGate(TimeBudget(tmp_path), epochs_to_rung=1).closed()
    assert closed_because(tmp_path) is not None and "the budget had run out" in closed_because(tmp_path)[1]
    stopper = BudgetStopper(TimeBudget(tmp_path))
    assert stopper("t", _epoch(1)) and not stopper.stop_all(), "trials stop one by one, at an epoch, never all at once"


def test_a_closed_gate_restored_by_a_resume_reads_the_resumes_budget(tmp_path: Path) -> None:
    start_clock(tmp_path, 0.5, started=time.time() - 1801)
    generator = GatedVariants(LaunchGate(TimeBudget(tmp_path), epochs_to_rung=1), random_state=0, max_concurrent=1)
    assert generator.is_finished()
    saved = pickle.dumps(generator)  # as Tune saves it with the experiment
    start_clock(tmp_path, 1.0, started=time.time())  # the resume: an hour from now
    restored = pickle.loads(saved)
    assert not restored.is_finished(), "a resumed search with time left must start trials again"
    assert closed_because(tmp_path) is None
