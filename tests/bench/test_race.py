"""bench/race.py's wiring: each method trains for real on a 2-epoch budget over the smallest data, consumes at most
that budget, and records a curve whose best is the best val/bbox_mAP of the epochs it counted, as read back from
what the trials left (Tune's result files, the Optuna study's journal)."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest

from bench.race import METHODS, Race, journal_storage, run_method
from cocodata.synth import write_dataset

BUDGET = 2
METRIC = "val/bbox_mAP"


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
