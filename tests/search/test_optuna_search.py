"""The Optuna searcher over several objectives and limits: what Optuna is told about each trial (no Ray runtime)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import write_space
from optuna.samplers import NSGAIISampler, TPESampler
from optuna.trial import TrialState

from search.optuna_search import ObjectiveSearch, make_sampler
from spaces.dataset import Dataset
from spaces.schema import Space, load_space

ROWS = [  # an ASHA-stopped trial: FPS after epoch 1 only, its best mAP at epoch 2, stopped after epoch 3
    {"epoch": 1, "training_iteration": 1, "val/bbox_mAP": 0.10, "inference/fps": 8.0, "model/gflops": 2.0},
    {"epoch": 2, "training_iteration": 2, "val/bbox_mAP": 0.30},
    {"epoch": 3, "training_iteration": 3, "val/bbox_mAP": 0.20},
]


def _space(tmp_path: Path, synth: Dataset, **sections: Any) -> Space:
    return load_space(write_space(tmp_path / "space.yaml", synth, **sections))


def _run(searcher: ObjectiveSearch, trial_id: str, rows: list[dict[str, float]]) -> None:
    assert searcher.suggest(trial_id) is not None
    for row in rows:
        searcher.on_trial_result(trial_id, row)
    searcher.on_trial_complete(trial_id, result=rows[-1])


def test_several_objectives_get_each_trials_values_over_all_its_epochs(tmp_path: Path, synth: Dataset) -> None:
    space = _space(tmp_path, synth, metric="val/bbox_mAP",
                   objectives=[{"metric": "inference/fps", "mode": "max"}, {"metric": "model/gflops", "mode": "min"}])
    searcher = ObjectiveSearch(space)
    _run(searcher, "t1", ROWS)
    (trial,) = searcher._ot_study.trials
    assert len(searcher._ot_study.directions) == 3
    assert trial.state == TrialState.COMPLETE
    assert trial.values == [0.30, 8.0, 2.0]  # best epoch's mAP, the costs its last result lacks


def test_limits_reach_optunas_constraints(tmp_path: Path, synth: Dataset) -> None:
    space = _space(tmp_path, synth, metric="val/bbox_mAP", objectives=[{"metric": "inference/fps", "mode": "max"}],
                   constraints={"inference/fps": {"min": 10}, "model/gflops": {"max": 4}})
    searcher = ObjectiveSearch(space)
    _run(searcher, "slow", ROWS)
    _run(searcher, "fast", [{**row, "inference/fps": 16.0} if "inference/fps" in row else row for row in ROWS])
    slow, fast = searcher._ot_study.trials
    # fps 8 is 20% short of 10; gflops 2 is half of 4
    assert slow.constraints == {"inference/fps >=": pytest.approx(0.2), "model/gflops <=": -0.5}
    assert fast.constraints == {"inference/fps >=": pytest.approx(-0.6), "model/gflops <=": -0.5}


def test_single_objective_is_told_the_best_epoch(tmp_path: Path, synth: Dataset) -> None:
    searcher = ObjectiveSearch(_space(tmp_path, synth, metric="val/bbox_mAP"))
    _run(searcher, "t1", ROWS)
    assert searcher._ot_study.trials[0].value == 0.30


@pytest.mark.parametrize(("algorithm", "sampler"), [("tpe", TPESampler), ("nsga2", NSGAIISampler)])
def test_sampler_per_algorithm(tmp_path: Path, synth: Dataset, algorithm: str, sampler: type) -> None:
    space = _space(tmp_path, synth, search={"algorithm": algorithm, "seed": 0}, budget={"epochs": 2, "trials": 40})
    made = make_sampler(space)
    assert isinstance(made, sampler)
    if algorithm == "nsga2":
        assert made._population_size == 10
