"""The MLflow tracking server goes away during a search: writes are buffered, or the search stops cleanly; a reply
lost after the server committed a write leaves one point, not two."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import write_space
from mlflow.tracking import MlflowClient
from services import FaultyProxy, free_port, mlflow_server

from cocodata.dataset import Dataset
from search.budget import TimeBudget
from search.callbacks import MlflowCallback
from search.tracking import TrackingSettings

SECRET = "s3cret-word"


def _driver(*args: str, cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "search", *args], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _read_until(process: subprocess.Popen[str], *texts: str, seen: list[str], timeout: float = 600) -> None:
    """Reads the driver's output into ``seen`` until each of ``texts`` has been printed, in any order."""
    assert process.stdout is not None
    deadline, missing = time.monotonic() + timeout, set(texts)
    for line in process.stdout:
        seen.append(line)
        missing = {text for text in missing if text not in line}
        if not missing:
            return
        assert time.monotonic() < deadline, f"no {sorted(missing)} within {timeout} s"
    raise AssertionError(f"the driver ended before printing {sorted(missing)}:\n{''.join(seen[-40:])}")


def _assert_all_points_once(url: str, name: str, epochs: int, trials: int) -> None:
    client = MlflowClient(url)
    experiment = client.get_experiment_by_name(name)
    runs = client.search_runs([experiment.experiment_id], "tags.`dettune.role` = 'trial'")
    assert len(runs) == trials
    for run in runs:
        assert run.data.tags["dettune.status"] == "completed"
        for key in ("val/bbox_mAP", "train/loss"):
            steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
            # Points buffered during an outage may land after later ones: order is by step, not by arrival.
            assert sorted(steps) == list(range(1, epochs + 1)), (key, steps)


def _space(tmp_path: Path, synth: Dataset, name: str, **budget: Any) -> Path:
    return write_space(tmp_path / "space.yaml", synth, name=name,
                       budget={"epochs": 3, "trials": 1, "max_concurrent": 1, **budget})


@pytest.mark.slow
def test_outage_is_buffered_and_delivered(tmp_path: Path, synth: Dataset) -> None:
    seen: list[str] = []
    space_file = _space(tmp_path, synth, "outage")
    with mlflow_server(tmp_path) as url, FaultyProxy(url) as proxy:
        driver = _driver("search", str(space_file), "--tracking-uri", proxy.url, cwd=tmp_path)
        _read_until(driver, "epoch 1/3", seen=seen)
        proxy.cut()  # the server is gone from the driver's view before the trial's second epoch can be written
        _read_until(driver, "MLflow unreachable", "epoch 3/3", seen=seen)  # training goes on meanwhile
        proxy.restore()
        output, _ = driver.communicate(timeout=600)
        assert driver.returncode == 0, "".join(seen) + output
        assert "buffered writes delivered" in "".join(seen) + output
        # One link to the experiment at the end, none of MLflow's two per ended run (on a server only).
        assert "View run" not in "".join(seen) + output and output.count("#/experiments/") == 1
        _assert_all_points_once(url, "outage", epochs=3, trials=1)


def _points(url: str, name: str) -> set[tuple[str, str]]:
    """(trial id, epoch) of every val/bbox_mAP point of the search's trial runs."""
    client = MlflowClient(url)
    runs = client.search_runs([client.get_experiment_by_name(name).experiment_id], "tags.`dettune.role` = 'trial'")
    return {(run.data.tags["dettune.trial_id"], str(m.step)) for run in runs
            for m in client.get_metric_history(run.info.run_id, "val/bbox_mAP")}


@pytest.mark.slow
def test_long_outage_stops_the_search_for_resume(tmp_path: Path, synth: Dataset) -> None:
    port, seen = free_port(), []
    space_file = _space(tmp_path, synth, "long-outage", trials=2)
    with mlflow_server(tmp_path, port) as url:
        driver = _driver("search", str(space_file), "--tracking-uri", url, "--tracking-timeout", "3",
                         cwd=tmp_path)
        _read_until(driver, "epoch 1/3", seen=seen)
    output, _ = driver.communicate(timeout=600)
    assert driver.returncode == 3, "".join(seen) + output
    assert "dettune resume long-outage" in output and "Traceback" not in output

    # The old server stays down: a resume on a new one (with credentials in its URI, and a new timeout) must
    # reach the restored callbacks too, or they would buffer for the old server and stop the search again.
    (tmp_path / "new").mkdir()
    with mlflow_server(tmp_path / "new") as url:
        with_credentials = url.replace("http://", f"http://ann:{SECRET}@")
        resumed = _driver("resume", "long-outage", "--tracking-uri", with_credentials, "--tracking-timeout", "60",
                          cwd=tmp_path)
        # The epochs the stopped driver saw reach the new server as the resume starts, not at the search's end.
        reported = {tuple(m.groups()) for m in re.finditer(r"trial (\w+): epoch (\d+)/", "".join(seen))}
        seen_resumed: list[str] = []
        _read_until(resumed, ": epoch ", seen=seen_resumed)
        assert reported and reported <= _points(url, "long-outage"), "".join(seen_resumed)
        output, _ = resumed.communicate(timeout=900)
        output = "".join(seen_resumed) + output
        assert resumed.returncode == 0, output[-3000:]
        _assert_all_points_once(url, "long-outage", epochs=3, trials=2)
        client = MlflowClient(url)
        (parent,) = client.search_runs([client.get_experiment_by_name("long-outage").experiment_id],
                                       "tags.`dettune.role` = 'parent'")
        assert client.download_artifacts(parent.info.run_id, "space.yaml", str(tmp_path / "new")) and (
            (tmp_path / "new" / "space.yaml").read_text() == space_file.read_text()), "space.yaml is not the file"
    assert SECRET not in output
    leaks = [p for p in (tmp_path / "runs").rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert leaks == [], "credentials written to files"


def test_a_write_the_server_committed_but_whose_reply_was_lost_is_not_recorded_twice(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # as in a search: the callback retries, not the client
    with mlflow_server(tmp_path) as url, FaultyProxy(url) as proxy:
        settings = TrackingSettings(uri=proxy.url)
        settings.save(tmp_path / "search.json")
        # Retried 50 ms later: a timestamp taken at the retry would differ from the first write's.
        callback = MlflowCallback(settings.tracker(tmp_path, "lost-reply"), settings_file=tmp_path / "search.json",
                                  params_of=dict, max_epochs=2, failure_of=lambda _: None,
                                  budget=TimeBudget(tmp_path), retry_every_s=0.05)
        trial = SimpleNamespace(trial_id="t0", config={"lr": 0.01}, last_result={"epoch": 1})  # what it reads
        callback.on_trial_start(0, [trial], trial)
        callback.on_experiment_end([])  # the run and its number are written before the drop is armed
        proxy.drop_next_reply("/runs/log-batch")
        callback.on_trial_result(1, [trial], trial, {"epoch": 1, "val/bbox_mAP": 0.25, "train/loss": 1.5})
        callback.on_experiment_end([])
        assert proxy.dropped, "the epoch's write never reached the server"
        console = capsys.readouterr().out
        assert "MLflow unreachable" in console and "buffered writes delivered" in console, console

        client = MlflowClient(url)
        (run,) = client.search_runs([client.get_experiment_by_name("lost-reply").experiment_id],
                                    "tags.`dettune.trial_id` = 't0'")
        for key, value in (("val/bbox_mAP", 0.25), ("train/loss", 1.5)):
            assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)] == [(1, value)], key


def test_tunes_loop_hands_writes_over_without_waiting_for_a_slow_server(tmp_path: Path) -> None:
    epochs, delay_s = 4, 0.5
    with mlflow_server(tmp_path) as url, FaultyProxy(url, reply_delay_s=delay_s) as proxy:
        settings = TrackingSettings(uri=proxy.url)
        settings.save(tmp_path / "search.json")
        callback = MlflowCallback(settings.tracker(tmp_path, "slow"), settings_file=tmp_path / "search.json",
                                  params_of=dict, max_epochs=epochs, failure_of=lambda _: None,
                                  budget=TimeBudget(tmp_path))
        trial = SimpleNamespace(trial_id="t0", config={"lr": 0.01}, last_result={"epoch": epochs})
        started = time.monotonic()
        callback.on_trial_start(0, [trial], trial)
        for epoch in range(1, epochs + 1):
            callback.on_trial_result(epoch, [trial], trial, {"epoch": epoch, "val/bbox_mAP": 0.1 * epoch})
            callback.on_step_end(epoch, [trial])
        handed_over = time.monotonic() - started
        callback.on_trial_complete(epochs + 1, [trial], trial)
        callback.on_experiment_end([trial])
        delivered = time.monotonic() - started

        # Each epoch's write alone waits delay_s for its reply: the loop must not have waited for any of them.
        assert handed_over < delay_s, f"Tune's loop waited {handed_over:.2f} s for the server"
        assert delivered > epochs * delay_s
        client = MlflowClient(url)
        (run,) = client.search_runs([client.get_experiment_by_name("slow").experiment_id],
                                    "tags.`dettune.trial_id` = 't0'")
        history = sorted((m.step, round(m.value, 6)) for m in client.get_metric_history(run.info.run_id,
                                                                                       "val/bbox_mAP"))
        assert history == [(epoch, round(0.1 * epoch, 6)) for epoch in range(1, epochs + 1)]
        assert run.data.tags["dettune.status"] == "completed" and run.info.status == "FINISHED"
