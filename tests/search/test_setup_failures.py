"""Trials that cannot start: failed once with a one-line reason, never retried; a search of them stops and exits 1."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import write_space
from mlflow.tracking import MlflowClient
from ray.tune import ExperimentAnalysis

from cocodata.dataset import Dataset
from search.callbacks import repeated_setup_failure
from search.cli import main
from tracking_names import TAG_FAILURE, TAG_STATUS

RUNNER_STARTS = "System environment:"  # mmengine logs it once per Runner, so once per attempt


def test_a_reason_shared_by_the_first_trials_stops_the_search() -> None:
    same = {"a": "FileNotFoundError: x.png", "b": "FileNotFoundError: x.png", "c": "FileNotFoundError: x.png"}
    assert repeated_setup_failure(same, any_reported=False, limit=3) == "FileNotFoundError: x.png"
    assert repeated_setup_failure(same, any_reported=True, limit=3) is None, "a trial trained: the space can"
    assert repeated_setup_failure({**same, "d": "KeyError: 'gt_seg'"}, any_reported=False, limit=3) is None
    assert repeated_setup_failure({"a": "x", "b": "x"}, any_reported=False, limit=3) is None


def test_setup_failures_are_not_retried_and_stop_a_search_that_then_exits_1(
        tmp_path: Path, synth: Dataset, ray_local: None, capfd: pytest.CaptureFixture[str]) -> None:
    # A file that exists (validate accepts it) but is no checkpoint: every trial fails loading it, before training.
    broken = tmp_path / "r18.pth"
    broken.write_bytes(b"not a checkpoint")
    trials = 5
    space_file = write_space(tmp_path / "space.yaml", synth, name="broken",
                             budget={"epochs": 1, "trials": trials, "max_concurrent": 1, "max_retries": 2},
                             pretrained={"r18": str(broken)})

    status = main(["search", str(space_file), "--storage", str(tmp_path / "runs")])

    console = capfd.readouterr()
    assert status == 1, console.err[-2000:]
    experiment = tmp_path / "runs" / "broken"
    ray_trials = ExperimentAnalysis(str(experiment)).trials
    assert all(t.run_metadata.num_failures == 0 for t in ray_trials), "a setup failure was retried"
    logs = sorted((experiment / "trials").glob("*/rank0/trial.log"))
    assert 3 <= len(logs) < trials, "the search did not stop after the first trials failed the same way"
    assert all(log.read_text().count(RUNNER_STARTS) == 1 for log in logs), "a trial was attempted twice"
    assert "first 3 trials all failed at setup with the same error" in console.err
    assert "no trial of broken finished" in console.err

    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("broken").experiment_id],
                              "tags.`dettune.role` = 'trial'")
    failed = [r for r in runs if r.data.tags[TAG_STATUS] == "failed"]
    assert len(failed) == len(logs)
    reason = failed[0].data.tags[TAG_FAILURE]
    assert reason.startswith("setup failed: ") and "\n" not in reason
    # One line per failed trial with its reason and the file holding its traceback; no raw traceback.
    lines = [line for line in console.out.splitlines() if "(not retried); traceback in " in line]
    assert len(lines) == len(logs)
    assert all("failed: setup failed: " in line and any(str(log) in line for log in logs) for line in lines)
    assert "Traceback" not in console.out + console.err
    assert "\x1b[" not in console.out + console.err, "colour codes reached the console"
