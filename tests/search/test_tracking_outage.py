"""The MLflow tracking server goes away during a search: writes are buffered, or the search stops cleanly."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import write_space
from mlflow.tracking import MlflowClient
from services import free_port, mlflow_server

from spaces.dataset import Dataset

SECRET = "s3cret-word"


def _driver(*args: str, cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "search", *args], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _read_until(process: subprocess.Popen[str], text: str, seen: list[str], timeout: float = 600) -> None:
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    for line in process.stdout:
        seen.append(line)
        if text in line:
            return
        assert time.monotonic() < deadline, f"no '{text}' within {timeout} s"
    raise AssertionError(f"the driver ended before printing '{text}':\n{''.join(seen[-40:])}")


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
    port, seen = free_port(), []
    space_file = _space(tmp_path, synth, "outage")
    with mlflow_server(tmp_path, port) as url:
        driver = _driver("search", str(space_file), "--tracking-uri", url, cwd=tmp_path)
        _read_until(driver, "epoch 1/3", seen)
    _read_until(driver, "MLflow unreachable", seen)  # training goes on while the server is down
    _read_until(driver, "epoch 3/3", seen)
    with mlflow_server(tmp_path, port) as url:
        output, _ = driver.communicate(timeout=600)
        assert driver.returncode == 0, "".join(seen) + output
        assert "buffered writes delivered" in "".join(seen) + output
        _assert_all_points_once(url, "outage", epochs=3, trials=1)


@pytest.mark.slow
def test_long_outage_stops_the_search_for_resume(tmp_path: Path, synth: Dataset) -> None:
    port, seen = free_port(), []
    space_file = _space(tmp_path, synth, "long-outage", trials=2)
    with mlflow_server(tmp_path, port) as url:
        driver = _driver("search", str(space_file), "--tracking-uri", url, "--tracking-timeout", "3",
                         cwd=tmp_path)
        _read_until(driver, "epoch 1/3", seen)
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
        output, _ = resumed.communicate(timeout=900)
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
