"""Faults injected for real: a diverging trial, a SIGKILLed trial process, a SIGKILLed search driver."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
from conftest import runs_of, write_space
from mlflow.tracking import MlflowClient
from ray.tune import ExperimentAnalysis
from services import descendants, dettune_cli, kill_once_a_trial_ends, proc_bytes

from cocodata.dataset import Dataset
from search.driver import SearchOptions, run_search
from search.tracking import Tracker
from tracking_names import TAG_FAILURE, TAG_STATUS, TAG_TRIAL


def _steps(tracking_uri: str, run: Any, key: str) -> list[int]:
    return [m.step for m in MlflowClient(tracking_uri).get_metric_history(run.info.run_id, key)]


def test_diverging_trial_fails_at_once_and_the_search_goes_on(tmp_path: Path, synth: Dataset,
                                                              ray_local: None) -> None:
    space_file = write_space(tmp_path / "space.yaml", synth, name="nan", search={"algorithm": "grid", "seed": 0},
                             budget={"epochs": 2, "trials": 1, "max_concurrent": 2, "max_retries": 2},
                             space={"lr": {"grid": [0.01, 10000.0]}})
    outcome = run_search(SearchOptions(space_file=space_file, storage=tmp_path / "runs"))

    runs = {float(r.data.params["lr"]): r for r in runs_of(outcome.tracking_uri, "nan")}
    diverged = runs[10000.0]
    assert diverged.data.tags[TAG_STATUS] == "failed"
    assert "loss became nan" in diverged.data.tags[TAG_FAILURE]
    assert all(v == v for v in diverged.data.metrics.values()), "a NaN reached MLflow"
    assert runs[0.01].data.tags[TAG_STATUS] == "completed"
    trials = ExperimentAnalysis(str(outcome.experiment_dir)).trials
    assert all(t.run_metadata.num_failures == 0 for t in trials), "a diverged trial must not be retried"
    assert "failed: TrialDiverged: loss became nan" in outcome.table


def _kill_when(predicate: Any, victims: Any, timeout: float = 600) -> threading.Thread:
    """Starts a thread that SIGKILLs ``victims()`` once ``predicate()`` holds."""
    def watch() -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                for pid in victims():
                    os.kill(pid, signal.SIGKILL)
                return
            time.sleep(0.2)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def _trial_processes() -> list[int]:
    """PIDs of the Ray actor processes that run Tune trials of the Ray this test process started.

    Their raylet is a child of this process, so they are its descendants; other Ray sessions on the machine (other
    test runs, other users) are not, and are left alone.
    """
    return [pid for pid in descendants(os.getpid()) if b"ImplicitFunc" in proc_bytes(f"/proc/{pid}/cmdline")]


def _mid_epoch(storage: Path, epoch: int) -> bool:
    """Whether some trial has saved epoch ``epoch - 1`` and logged an iteration of ``epoch``."""
    return any(f"Epoch(train) [{epoch}]" in log.read_text(errors="ignore")
               for log in storage.glob("*/trials/*/rank0/trial.log"))


@pytest.mark.slow
def test_killed_trial_process_resumes_in_the_same_run(tmp_path: Path, synth: Dataset, ray_local: None,
                                                      capfd: pytest.CaptureFixture[str]) -> None:
    space_file = write_space(tmp_path / "space.yaml", synth, name="kill-trial",
                             budget={"epochs": 3, "trials": 1, "max_retries": 2})
    fixed_logging = tmp_path / "runs"
    killer = _kill_when(lambda: _mid_epoch(fixed_logging, 2), _trial_processes)
    outcome = run_search(SearchOptions(space_file=space_file, storage=fixed_logging))
    killer.join(timeout=1)

    (trial,) = ExperimentAnalysis(str(outcome.experiment_dir)).trials
    assert trial.run_metadata.num_failures == 1, "the kill did not happen or was not retried"
    # The console says so: which attempt, why, and from which epoch (the kill came during epoch 2).
    (retried,) = [line for line in capfd.readouterr().out.splitlines() if "retried, attempt" in line]
    assert f"trial {trial.trial_id}: retried, attempt 2 of 3, from its epoch 1 checkpoint, after: " in retried
    (run,) = runs_of(outcome.tracking_uri, "kill-trial")
    assert run.data.tags[TAG_STATUS] == "completed" and run.data.tags[TAG_TRIAL] == trial.trial_id
    for key in ("val/bbox_mAP", "train/loss", "train/lr"):
        assert _steps(outcome.tracking_uri, run, key) == [1, 2, 3], key
    log = next((outcome.experiment_dir / "trials").glob("*/rank0/trial.log")).read_text()
    assert "Load checkpoint from" in log or "resumed epoch: 1" in log


@pytest.mark.slow
def test_killed_driver_resumes_with_the_same_trials(tmp_path: Path, synth: Dataset) -> None:
    space_file = write_space(tmp_path / "space.yaml", synth, name="kill-driver",
                             budget={"epochs": 2, "trials": 4, "max_concurrent": 2},
                             scheduler={"type": "asha", "grace_epochs": 1, "reduction_factor": 2})
    kill_once_a_trial_ends(dettune_cli("search", str(space_file), cwd=tmp_path))
    tracking_uri = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    # What a driver killed just after starting a trial leaves when Tune's snapshot did not hold the trial yet:
    # the trial's open run, which no resumed driver hears of again.
    Tracker(tracking_uri, "kill-driver").start_trial("unsnapshotted", {"lr": 0.01})

    resumed = dettune_cli("resume", "kill-driver", cwd=tmp_path)
    output, _ = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, output[-3000:]

    (lost,) = [r for r in runs_of(tracking_uri, "kill-driver") if r.data.tags[TAG_TRIAL] == "unsnapshotted"]
    assert lost.data.tags[TAG_STATUS] == "failed" and lost.info.status == "FAILED"
    assert lost.data.tags[TAG_FAILURE].startswith("lost: "), lost.data.tags
    runs = [r for r in runs_of(tracking_uri, "kill-driver") if r.data.tags[TAG_TRIAL] != "unsnapshotted"]
    assert len(runs) == 4, "trials were lost or duplicated"
    assert len({r.data.tags[TAG_TRIAL] for r in runs}) == 4
    for run in runs:
        assert run.data.tags[TAG_STATUS] in ("completed", "stopped")
        steps = _steps(tracking_uri, run, "val/bbox_mAP")
        assert steps == list(range(1, len(steps) + 1)) and steps, steps
    study = optuna.load_study(study_name="kill-driver", storage=f"sqlite:///{tmp_path / 'runs' / 'optuna.db'}")
    copied = sorted(t.user_attrs["dettune.trial"] for t in study.trials)
    assert copied == sorted(r.data.tags[TAG_TRIAL] for r in runs), "the study's copy lost or doubled a trial"
