"""Pure logic of several objectives and limits: a trial's values, feasibility, the Pareto front (no Ray)."""

from __future__ import annotations

import itertools
import random

import pytest

from spaces.objectives import (
    UNMEASURED,
    best_trial,
    feasible_front,
    fold_row,
    is_feasible,
    pareto_front,
    shortfall,
    trial_values,
    violations,
)
from spaces.schema import Limit

FPS_AT_LEAST_10 = {"inference/fps": Limit(min=10)}


def test_scores_come_from_the_best_epoch_and_costs_from_the_last_measurement() -> None:
    rows = [{"val/bbox_mAP": 0.2, "val/bbox_mAP_s": 0.30, "inference/fps": 12.0, "model/gflops": 3.0},
            {"val/bbox_mAP": 0.4, "val/bbox_mAP_s": 0.10},
            {"val/bbox_mAP": 0.3, "val/bbox_mAP_s": 0.50, "inference/fps": 11.0}]
    values = trial_values(rows, primary="val/bbox_mAP", mode="max")
    assert values == {"val/bbox_mAP": 0.4, "val/bbox_mAP_s": 0.10, "inference/fps": 11.0, "model/gflops": 3.0}


def test_min_mode_and_ties_keep_the_first_best_epoch() -> None:
    rows = [{"val/x": 0.5, "val/y": 1.0}, {"val/x": 0.2, "val/y": 2.0}, {"val/x": 0.2, "val/y": 3.0}]
    assert trial_values(rows, primary="val/x", mode="min") == {"val/x": 0.2, "val/y": 2.0}
    assert fold_row({}, {"inference/fps": 5.0}, primary="val/x", mode="max") == {"inference/fps": 5.0}


def test_violations_are_relative_and_signed_as_optuna_expects() -> None:
    limits = {"inference/fps": Limit(min=10), "model/params_M": Limit(max=50), "model/gflops": Limit(min=1, max=4)}
    values = {"inference/fps": 5.0, "model/params_M": 40.0, "model/gflops": 2.0}
    assert violations(values, limits) == [0.5, -0.2, -1.0, -0.5]
    assert not is_feasible(values, limits)
    assert shortfall(values, limits) == 0.5
    assert is_feasible({**values, "inference/fps": 10.0}, limits)


def test_an_unreported_metric_breaks_its_limit() -> None:
    assert violations({}, FPS_AT_LEAST_10) == [UNMEASURED]
    assert not is_feasible({"inference/fps": float("nan")}, FPS_AT_LEAST_10)


def test_pareto_front_of_a_small_example() -> None:
    points = {"a": [0.5, 10.0], "b": [0.4, 20.0], "c": [0.3, 15.0], "d": [0.5, 5.0], "e": [0.4, 20.0]}
    assert pareto_front(points, ["max", "max"]) == ["a", "b", "e"]  # equal points don't dominate each other
    assert pareto_front(points, ["max", "min"]) == ["d"]


def _brute_force_front(points: dict[int, list[float]], modes: list[str]) -> set[int]:
    """Non-dominated by definition: nobody is >= everywhere and > somewhere (signs flipped for min)."""
    signs = [1.0 if m == "max" else -1.0 for m in modes]

    def beats(p: list[float], q: list[float]) -> bool:
        pairs = [(s * a, s * b) for s, a, b in zip(signs, p, q, strict=True)]
        return all(a >= b for a, b in pairs) and any(a > b for a, b in pairs)

    return {k for k, q in points.items() if not any(beats(p, q) for p in points.values())}


@pytest.mark.parametrize("modes", [["max", "max"], ["max", "min"], ["min", "max", "min"]])
def test_pareto_front_matches_the_definition_on_random_points(modes: list[str]) -> None:
    rng = random.Random(len(modes))
    for _ in range(30):
        points = {i: [float(rng.randint(0, 5)) for _ in modes] for i in range(12)}
        assert set(pareto_front(points, modes)) == _brute_force_front(points, modes)


def test_best_and_front_leave_out_trials_outside_the_limits() -> None:
    values = {"fast": {"val/bbox_mAP": 0.30, "inference/fps": 20.0},
              "slow": {"val/bbox_mAP": 0.45, "inference/fps": 4.0},
              "middle": {"val/bbox_mAP": 0.35, "inference/fps": 12.0},
              "dominated": {"val/bbox_mAP": 0.25, "inference/fps": 11.0},
              "no-fps": {"val/bbox_mAP": 0.50}}
    directions = [("val/bbox_mAP", "max"), ("inference/fps", "max")]
    assert best_trial(values, metric="val/bbox_mAP", mode="max", constraints={}) == "no-fps"
    assert best_trial(values, metric="val/bbox_mAP", mode="max", constraints=FPS_AT_LEAST_10) == "middle"
    assert best_trial(values, metric="val/bbox_mAP", mode="max",
                      constraints={"inference/fps": Limit(min=100)}) is None
    assert feasible_front(values, directions=directions, constraints={}) == ["fast", "slow", "middle"]
    assert feasible_front(values, directions=directions, constraints=FPS_AT_LEAST_10) == ["fast", "middle"]


def test_front_members_are_never_dominated_by_each_other() -> None:
    rng = random.Random(7)
    values = {str(i): {"val/bbox_mAP": rng.random(), "inference/fps": rng.uniform(1, 30)} for i in range(40)}
    directions = [("val/bbox_mAP", "max"), ("inference/fps", "max")]
    front = feasible_front(values, directions=directions, constraints=FPS_AT_LEAST_10)
    assert front and all(values[k]["inference/fps"] >= 10 for k in front)
    for a, b in itertools.permutations(front, 2):
        assert not (values[a]["val/bbox_mAP"] >= values[b]["val/bbox_mAP"]
                    and values[a]["inference/fps"] >= values[b]["inference/fps"])
