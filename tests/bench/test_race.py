"""bench/race.py's wiring: each method trains for real on a 2-epoch budget over the smallest data, consumes at most
that budget, and records a curve whose best is the best val/bbox_mAP of the epochs it counted, as read back from
what the trials left (Tune's result files, the Optuna study's journal)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import optuna
import pytest

from bench.race import METHODS, PASHA, Race, journal_storage, run_method
from cocodata.synth import write_dataset

BUDGET = 2
METRIC = "val/bbox_mAP"
NO_CONTROLLER: Any = None  # PASHA decides from the trial and its result alone


@pytest.fixture(scope="module")
def smallest_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("race-data")
    write_dataset(root, images=4, size=144, seed=0)
    return root


def trained(folder: Path) -> dict[tuple[str, int], float]:
    """(trial, epoch) -> val/bbox_mAP of every epoch the method's trials reported, read from their own records."""
    values = {}
    for result_file in folder.rglob("result.json"):  # Tune's per-trial results, one JSON line per report
        for line in result_file.read_text().splitlines():
            row = json.loads(line)
            values[(row["trial_id"], row["epoch"])] = row[METRIC]
    for journal in folder.glob("*.journal"):  # the Optuna study the two processes shared
        study = optuna.load_study(study_name=journal.stem, storage=journal_storage(journal))
        for trial in study.trials:
            values.update({(f"optuna-{trial.number}", epoch): v for epoch, v in trial.intermediate_values.items()})
    return values


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_stays_within_the_budget_and_its_curve_holds_the_best_it_trained(
        method: str, smallest_data: Path, tmp_path: Path, ray_local: None) -> None:
    run = run_method(method, Race(smallest_data, tmp_path, "heads", seed=0, epochs=2, budget=BUDGET))
    assert 1 <= len(run.events) <= BUDGET, run.events
    read = trained(tmp_path / method)
    counted = [(event.trial, event.epoch) for event in run.events]
    assert len(set(counted)) == len(counted), f"an epoch counted twice: {counted}"
    assert set(counted) <= set(read), (counted, read)
    assert all(event.value == read[(event.trial, event.epoch)] for event in run.events)
    curve = run.curve()
    assert [consumed for consumed, _, _ in curve] == list(range(1, len(counted) + 1))
    assert curve[-1][2] == max(read[key] for key in counted)


def _pasha_after(rung3_of_a: float) -> tuple[PASHA, list[str]]:
    """Trials b then a reach epoch 1 (a better), then epoch 3, the current maximum: b at 0.6, a at ``rung3_of_a``."""
    pasha = PASHA(time_attr="epoch", metric=METRIC, mode="max", max_t=9, grace_period=1, reduction_factor=3)
    decisions = [pasha.on_trial_result(NO_CONTROLLER, cast(Any, SimpleNamespace(trial_id=trial)),
                                       {"epoch": epoch, METRIC: value})
                 for trial, epoch, value in [("b", 1, 0.4), ("a", 1, 0.5), ("b", 3, 0.6), ("a", 3, rung3_of_a)]]
    return pasha, decisions


def test_pasha_keeps_its_maximum_rung_while_the_top_two_rungs_agree() -> None:
    pasha, decisions = _pasha_after(0.7)  # a above b at epochs 1 and 3
    assert decisions == ["CONTINUE", "CONTINUE", "STOP", "STOP"]
    assert pasha.max_rung == 3


def test_pasha_raises_its_maximum_rung_once_the_top_two_rungs_disagree() -> None:
    pasha, decisions = _pasha_after(0.55)  # a above b at epoch 1, below at epoch 3
    assert pasha.max_rung == 9
    assert decisions[:3] == ["CONTINUE", "CONTINUE", "STOP"]  # b reached the maximum while it was 3
    assert decisions[3] == "STOP"  # a: below the cutoff of rung 3 (b's 0.6), as ASHA stops it
