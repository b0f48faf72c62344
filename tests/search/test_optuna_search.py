"""The Optuna searcher over several objectives and limits: what Optuna is told about each trial (no Ray runtime)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
import pytest
from conftest import write_space
from optuna.samplers import NSGAIISampler, TPESampler
from optuna.trial import TrialState

from cocodata.dataset import Dataset
from search.optuna_search import TRIAL_ATTR, ObjectiveSearch, StudyMirror, make_sampler
from search.tracking import TrackingSettings
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
    (trial,) = searcher.study.trials
    assert len(searcher.study.directions) == 3
    assert trial.state == TrialState.COMPLETE
    assert trial.values == [0.30, 8.0, 2.0]  # best epoch's mAP, the costs its last result lacks


def test_limits_reach_optunas_constraints(tmp_path: Path, synth: Dataset) -> None:
    space = _space(tmp_path, synth, metric="val/bbox_mAP", objectives=[{"metric": "inference/fps", "mode": "max"}],
                   constraints={"inference/fps": {"min": 10}, "model/gflops": {"max": 4}})
    searcher = ObjectiveSearch(space)
    _run(searcher, "slow", ROWS)
    _run(searcher, "fast", [{**row, "inference/fps": 16.0} if "inference/fps" in row else row for row in ROWS])
    slow, fast = searcher.study.trials
    # fps 8 is 20% short of 10; gflops 2 is half of 4
    assert slow.constraints == {"inference/fps >=": pytest.approx(0.2), "model/gflops <=": -0.5}
    assert fast.constraints == {"inference/fps >=": pytest.approx(-0.6), "model/gflops <=": -0.5}


def test_single_objective_is_told_the_best_epoch(tmp_path: Path, synth: Dataset) -> None:
    searcher = ObjectiveSearch(_space(tmp_path, synth, metric="val/bbox_mAP"))
    _run(searcher, "t1", ROWS)
    assert searcher.study.trials[0].value == 0.30


def test_a_stop_on_a_new_best_epoch_tells_that_epoch(tmp_path: Path, synth: Dataset) -> None:
    """ASHA's stop comes with the result it stopped on, which the searcher never saw as a result."""
    searcher = ObjectiveSearch(_space(tmp_path, synth, metric="val/bbox_mAP"))
    searcher.suggest("t1")
    searcher.on_trial_result("t1", ROWS[0])
    searcher.on_trial_complete("t1", result=ROWS[1])
    (trial,) = searcher.study.trials
    assert (trial.state, trial.value, trial.intermediate_values) == (TrialState.COMPLETE, 0.30, {1: 0.10})


def test_failed_and_valueless_trials_end_as_optuna_expects(tmp_path: Path, synth: Dataset) -> None:
    space = _space(tmp_path, synth, metric="val/bbox_mAP", objectives=[{"metric": "inference/fps", "mode": "max"}])
    searcher = ObjectiveSearch(space)
    searcher.suggest("error")
    searcher.on_trial_result("error", ROWS[0])
    searcher.on_trial_complete("error", error=True)
    searcher.suggest("no-fps")
    searcher.on_trial_complete("no-fps", result=ROWS[1])
    searcher.on_trial_complete("no-fps", result=ROWS[1])  # told once: a second end changes nothing
    assert [(t.state, t.values) for t in searcher.study.trials] == [(TrialState.FAIL, None),
                                                                      (TrialState.PRUNED, None)]


def test_a_restored_searcher_finishes_the_trials_it_had_asked(tmp_path: Path, synth: Dataset) -> None:
    space = _space(tmp_path, synth, metric="val/bbox_mAP", objectives=[{"metric": "inference/fps", "mode": "max"}],
                   constraints={"inference/fps": {"min": 10}})
    before = ObjectiveSearch(space)
    _run(before, "done", ROWS)
    asked = before.suggest("running")
    before.on_trial_result("running", ROWS[0])
    before.save(str(tmp_path / "searcher.pkl"))

    after = ObjectiveSearch(space)  # as Tune rebuilds it on resume, then restores its saved state
    after.restore(str(tmp_path / "searcher.pkl"))
    after.on_trial_result("running", ROWS[1])
    after.on_trial_complete("running", result=ROWS[1])
    done, running = after.study.trials
    assert done.values == [0.30, 8.0] and running.params == asked
    assert running.state == TrialState.COMPLETE and running.values == [0.30, 8.0]
    assert running.constraints == {"inference/fps >=": pytest.approx(0.2)}
    assert after.suggest("next") is not None and len(after.study.trials) == 3


def test_the_study_copy_is_complete_at_every_save_and_mended_on_restore(tmp_path: Path, synth: Dataset) -> None:
    space = _space(tmp_path, synth)
    settings = tmp_path / "runs" / space.name / "search.json"
    settings.parent.mkdir(parents=True)
    TrackingSettings().save(settings)
    copy_url = f"sqlite:///{tmp_path / 'runs' / 'optuna.db'}"

    def copied() -> list[str]:
        return sorted(t.user_attrs[TRIAL_ATTR] for t in optuna.load_study(study_name=space.name,
                                                                         storage=copy_url).trials)

    before = ObjectiveSearch(space, mirror=StudyMirror(settings, space, fresh=True))
    for trial_id in ("a", "b", "c"):
        _run(before, trial_id, ROWS)
    before.save(str(tmp_path / "searcher.pkl"))  # Tune's snapshot: the copies handed over are all made by now
    assert copied() == ["a", "b", "c"]

    # A driver killed before its copying thread got to them: the copy lacks trials the saved searcher told.
    optuna.delete_study(study_name=space.name, storage=copy_url)
    after = ObjectiveSearch(space)
    after.restore(str(tmp_path / "searcher.pkl"))
    _run(after, "d", ROWS)
    after.save(str(tmp_path / "searcher.pkl"))
    assert copied() == ["a", "b", "c", "d"]


@pytest.mark.parametrize(("algorithm", "sampler"), [("tpe", TPESampler), ("nsga2", NSGAIISampler)])
def test_sampler_per_algorithm(tmp_path: Path, synth: Dataset, algorithm: str, sampler: type) -> None:
    space = _space(tmp_path, synth, search={"algorithm": algorithm, "seed": 0}, budget={"epochs": 2, "trials": 40})
    made = make_sampler(space)
    assert isinstance(made, sampler)
    if algorithm == "nsga2":
        assert made._population_size == 10
    else:
        assert made._n_startup_trials == 8  # a fifth of the 40 trials


@pytest.mark.parametrize(("trials", "startup"), [(4, 2), (26, 5), (50, 10), (1000, 10)])
def test_tpe_models_after_a_fifth_of_the_budget_between_2_and_10_random_trials(
        tmp_path: Path, synth: Dataset, trials: int, startup: int) -> None:
    space = _space(tmp_path, synth, search={"algorithm": "tpe", "seed": 0}, budget={"epochs": 2, "trials": trials})
    assert make_sampler(space)._n_startup_trials == startup
