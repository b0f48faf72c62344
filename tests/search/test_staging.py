"""Staged searches as pure logic: inheritance, warm-start point filtering, the warm study, chains (no Ray)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
import pytest

from results.store import Point, TrialRecord
from search.optuna_search import new_study
from search.staging import (
    EarlierSearch,
    StagingError,
    WarmStart,
    check_chain,
    inherit,
    remaining_grid,
    stage,
    warm_points,
    warm_trials,
)
from spaces.errors import SpaceError
from spaces.schema import Space, load_space

SPACES_DIR = Path(__file__).resolve().parents[2] / "spaces"
FIXED = {"backbone": "r18", "preset": "tiny", "optimizer": "sgd", "batch_size": 4}


def space(name: str, **sections: Any) -> Space:
    doc: dict[str, Any] = {
        "name": name, "base": "mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py",
        "data": {"root": "data/synth", "train": "train.json", "val": "val.json"},
        "budget": {"epochs": 2, "trials": 4}, "search": {"algorithm": "tpe", "seed": 0},
        "space": {"lr": {"loguniform": [0.001, 0.1]}, "scale": {"choice": [[128, 128], [160, 160]]}},
        "fixed": FIXED,
    }
    doc.update(sections)
    return Space.from_json(doc)


def trial(exp_num: str, status: str, params: dict[str, str], maps: list[float],
          metric: str = "val/bbox_mAP") -> TrialRecord:
    """A trial as MLflow holds it: params as text, ``metric`` at epochs 1, 2, ..."""
    history = {metric: [Point(epoch, value, epoch) for epoch, value in enumerate(maps, start=1)]}
    return TrialRecord(run_id=exp_num, exp_num=exp_num, trial_id=exp_num, status=status,
                       stopped_at=len(maps) if status == "stopped" else None, failure=None, lb_note=None,
                       params={**{k: str(v) for k, v in FIXED.items()}, "epochs": "2", **params}, history=history)


A_TRIALS = [
    trial("a-1", "completed", {"lr": "0.01", "scale": "160x160"}, [0.10, 0.30]),
    trial("a-2", "completed", {"lr": "0.02", "scale": "128x128"}, [0.20, 0.40]),  # the best completed
    trial("a-3", "stopped", {"lr": "0.05", "scale": "160x160"}, [0.50]),  # higher, but stopped at epoch 1
    trial("a-4", "failed", {"lr": "0.09", "scale": "160x160"}, []),
]


def earlier(name: str = "a", trials: list[TrialRecord] = A_TRIALS, **sections: Any) -> EarlierSearch:
    return EarlierSearch(name=name, space=space(name, **sections), trials=trials)


# --- inherit ------------------------------------------------------------------------------------------------


def test_knob_values_come_back_typed_from_mlflow_text() -> None:
    values = space("a").values_from_params({"lr": "0.02", "scale": "128x128", "backbone": "r18"})

    assert values == {**FIXED, "epochs": 2, "lr": 0.02, "scale": [128, 128]}


def test_inherit_takes_the_best_completed_trial_for_knobs_neither_searched_nor_fixed() -> None:
    later = space("b", space={"schedule": {"choice": ["step", "cosine"]}}, fixed={"batch_size": 2}, inherit="a")

    staged = stage(later, {"a": earlier()})

    got = {item.knob: (item.value, item.trial) for item in staged.inherited}
    assert got == {"lr": (0.02, "a-2"), "scale": ([128, 128], "a-2"), "backbone": ("r18", "a-2"),
                   "preset": ("tiny", "a-2"), "optimizer": ("sgd", "a-2")}
    assert staged.space.fixed == {"lr": 0.02, "scale": [128, 128], "backbone": "r18", "preset": "tiny",
                                  "optimizer": "sgd", "batch_size": 2}  # the explicit batch_size wins
    assert "schedule" not in staged.space.fixed
    assert "inherited   lr = 0.02  from a-2, val/bbox_mAP 40.0" in staged.lines()


def test_a_later_search_in_inherit_wins() -> None:
    b_trials = [trial("b-1", "completed", {"lr": "0.005", "scale": "160x160"}, [0.1, 0.2])]
    later = space("c", space={"schedule": {"choice": ["step", "cosine"]}}, fixed={}, inherit=["a", "b"])

    inherited = inherit(later, [earlier("a"), earlier("b", b_trials)])

    assert {item.knob: item.trial for item in inherited}["lr"] == "b-1"
    assert {item.knob: item.value for item in inherited}["scale"] == [160, 160]


def test_inherit_from_a_search_without_a_completed_trial_is_an_error() -> None:
    with pytest.raises(StagingError, match=r"a has no completed trial .*1 stopped, 1 failed.*dettune resume a"):
        inherit(space("b"), [earlier(trials=A_TRIALS[2:])])


def test_inherit_across_metric_directions_is_an_error() -> None:
    with pytest.raises(StagingError, match="a maximises val/bbox_mAP but this space minimises"):
        inherit(space("b", mode="min"), [earlier()])


def test_inherit_and_warm_start_in_the_schema() -> None:
    assert space("b", inherit="a").inherit == ["a"]
    with pytest.raises(SpaceError) as caught:
        space("b", inherit=["b"], warm_start=["a", "a"], search={"algorithm": "random"})
    rules = [problem.rule for problem in caught.value.problems]
    assert any("can't build on itself" in rule for rule in rules)
    assert any("named twice" in rule for rule in rules)
    assert any("random sampling can't use earlier trials" in rule for rule in rules)


# --- warm start -----------------------------------------------------------------------------------------------


def test_warm_points_keep_trials_inside_the_space_with_equal_other_knobs() -> None:
    later = space("b", space={"lr": {"loguniform": [0.001, 0.06]}, "scale": {"choice": [[160, 160], [128, 128]]}})
    outside = trial("a-5", "completed", {"lr": "0.08", "scale": "160x160"}, [0.1, 0.2])
    other_batch = trial("a-6", "completed", {"lr": "0.02", "scale": "160x160", "batch_size": "2"}, [0.1, 0.2])

    searched_batch = {"lr": {"loguniform": [0.001, 0.1]}, "scale": {"choice": [[128, 128], [160, 160]]},
                      "batch_size": {"choice": [2, 4]}}
    source = earlier(trials=[*A_TRIALS, outside, other_batch], space=searched_batch,
                     fixed={k: v for k, v in FIXED.items() if k != "batch_size"})

    warm = warm_points(later, [source])

    assert [(p.trial, p.pruned, p.value, p.intermediate) for p in warm.points] == [
        ("a-1", False, 0.30, {1: 0.10, 2: 0.30}),
        ("a-2", False, 0.40, {1: 0.20, 2: 0.40}),
        ("a-3", True, None, {1: 0.50}),
    ]
    assert warm.points[1].values == {"lr": 0.02, "scale": [128, 128]}
    reasons = {item.trial: item.reason for item in warm.left_out}
    assert reasons["a-4"].startswith("failed")
    assert reasons["a-5"] == "lr 0.08 is outside this space's loguniform [0.001, 0.06]"
    assert reasons["a-6"] == "batch_size 2, this search has 4"


def test_warm_points_from_another_base_config_are_left_out() -> None:
    later = space("b", base="mmdet::cascade_rcnn/cascade-rcnn_r50_fpn_1x_coco.py")

    warm = warm_points(later, [earlier(trials=A_TRIALS[:1])])

    assert not warm.points and "its base config differs" in warm.left_out[0].reason


def test_the_warm_study_holds_completed_and_pruned_trials_as_optuna_sees_them() -> None:
    later = space("b")
    warm = warm_points(later, [earlier(trials=A_TRIALS)])

    study = new_study(later)
    study.add_trials(warm_trials(later, warm))

    states = [(t.state, t.value, t.intermediate_values, t.params) for t in study.trials]
    assert states == [
        (optuna.trial.TrialState.COMPLETE, 0.30, {1: 0.10, 2: 0.30}, {"lr": 0.01, "scale": "[160, 160]"}),
        (optuna.trial.TrialState.COMPLETE, 0.40, {1: 0.20, 2: 0.40}, {"lr": 0.02, "scale": "[128, 128]"}),
        (optuna.trial.TrialState.PRUNED, None, {1: 0.50}, {"lr": 0.05, "scale": "[160, 160]"}),
    ]
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE
    assert study.best_trial.params["lr"] == 0.02


def test_a_grid_skips_only_points_trained_to_the_full_budget() -> None:
    grid = [{"scale": [128, 128]}, {"scale": [160, 160]}, {"scale": [192, 192]}]
    later = space("b", search={"algorithm": "grid"}, space={"scale": {"grid": [s["scale"] for s in grid]}},
                  fixed={**FIXED, "lr": 0.01})
    warm = warm_points(later, [earlier(trials=[trial("a-1", "completed", {"lr": "0.01", "scale": "160x160"},
                                                     [0.1, 0.3]),
                                               trial("a-3", "stopped", {"lr": "0.01", "scale": "128x128"}, [0.5])])])

    assert remaining_grid(grid, warm) == [{"scale": [128, 128]}, {"scale": [192, 192]}]
    assert remaining_grid(grid, WarmStart()) == grid
    assert stage(later, {"a": earlier()}).grid is None  # warm_start not asked for: nothing skipped


# --- chains -----------------------------------------------------------------------------------------------------


def test_the_logs_experiments_form_a_chain(tmp_path: Path) -> None:
    files = [SPACES_DIR / f"{name}.yaml" for name in ("backbone-vs-map", "scale-vs-small", "freeze-vs-map")]
    spaces = [(str(file), load_space(file)) for file in files]
    no_store = f"sqlite:///{tmp_path / 'mlflow.db'}"

    check_chain(spaces, no_store)
    assert spaces[1][1].inherit == ["backbone-vs-map"]
    assert spaces[2][1].inherit == ["backbone-vs-map", "scale-vs-small"]
    with pytest.raises(StagingError, match="scale-vs-small is neither in .* nor earlier in the chain"):
        check_chain([spaces[0], spaces[2], spaces[1]], no_store)
