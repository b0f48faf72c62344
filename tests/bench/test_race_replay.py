"""bench/race_replay.py's replay: each method's trials read the table's curve of the configuration they asked for
(lr at the table's nearest), at most two run at once, an epoch is counted once and in clock order, a trial stopped
by its method or by its divergence trains no further, and the run ends at the budget."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import pytest

from bench.race import Race
from bench.race_replay import METHODS, Curve, Method, Table, replay

EPOCHS = 4
LR = [0.005, 0.0075, 0.01, 0.015, 0.02]
KNOBS = {"roi_head": ["faster", "cascade"], "schedule": ["step", "cosine"]}


def lr_rank(config: dict[str, Any]) -> int:
    """The position of the table's lr nearest ``config``'s in log space."""
    return min(range(len(LR)), key=lambda i: abs(math.log(LR[i] / config["lr"])))


def value_of(config: dict[str, Any], epoch: int) -> float:
    """A curve every configuration has its own of: it grows with the epoch, lr and the knobs' positions."""
    knob_rank = sum(values.index(config[knob]) * 10 for knob, values in KNOBS.items())
    return round(epoch * 0.001 + lr_rank(config) * 0.0001 + knob_rank * 0.00001, 6)


def synthetic_table() -> Table:
    table = Table("heads", 0, EPOCHS, LR, {})
    for lr, *knobs in itertools.product(LR, *KNOBS.values()):
        config = {"lr": lr, **dict(zip(KNOBS, knobs, strict=True))}
        # The highest lr diverges after epoch 2 (its curve ends there); the first epoch holds the trial's start.
        epochs = 2 if lr == LR[-1] else EPOCHS
        values = [value_of(config, epoch) for epoch in range(1, epochs + 1)]
        seconds = [2.0 + 0.5 * LR.index(lr), 1.0, 1.0, 1.0][:epochs]
        table.curves[json.dumps(config, sort_keys=True)] = Curve(values, values, seconds)
    return table


class Watched:
    """A method whose every ask and decision the test keeps, and how many of its trials were running at most."""

    def __init__(self, method: Method) -> None:
        self.method, self.configs, self.ended, self.running, self.most = method, {}, set(), set(), 0

    def ask(self) -> tuple[str, dict[str, Any]] | None:
        asked = self.method.ask()
        if asked is not None:
            self.configs[asked[0]] = asked[1]
            self.running.add(asked[0])
            self.most = max(self.most, len(self.running))
        return asked

    def tell(self, trial: str, row: dict[str, float], last: bool) -> bool:
        assert trial not in self.ended, f"{trial} trained on after its method stopped it"
        go_on = self.method.tell(trial, row, last)
        if not go_on:
            self.ended.add(trial)
            self.running.discard(trial)
        return go_on


@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_replays_the_curves_it_asked_for_two_at_a_time_within_the_budget(method: str) -> None:
    budget = 10
    watched = Watched(METHODS[method](Race(Path("."), Path("."), "heads", 0, EPOCHS, budget)))
    events = replay(watched, synthetic_table(), budget)
    assert len(events) == budget
    assert watched.most <= 2
    assert len({(e.trial, e.epoch) for e in events}) == budget, "an epoch counted twice"
    assert [e.seconds for e in events] == sorted(e.seconds for e in events)
    for trial in {e.trial for e in events}:
        epochs = [e.epoch for e in events if e.trial == trial]
        assert epochs == list(range(1, len(epochs) + 1))
        if lr_rank(watched.configs[trial]) == len(LR) - 1:
            assert len(epochs) <= 2, f"{trial} trained past its divergence"
    assert all(e.value == value_of(watched.configs[e.trial], e.epoch) for e in events)
