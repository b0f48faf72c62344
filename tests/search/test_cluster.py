"""The search on a real Ray cluster: `ray start --head`, an `mlflow server`, and `ray job submit`."""

from __future__ import annotations

import json
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from services import mlflow_server, ray_head, submit_job

from cocodata.dataset import Dataset

REPO = Path(__file__).resolve().parents[2]


def _mlflow_api(url: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    request = urllib.request.Request(f"{url}/api/2.0/mlflow/{path}", method="POST" if body else "GET",
                                     data=json.dumps(body).encode() if body else None,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return dict(json.load(response))


@pytest.mark.slow
def test_search_submitted_as_a_ray_job(tmp_path: Path, synth: Dataset, no_local_ray: None) -> None:
    with ray_head() as head, mlflow_server(tmp_path) as tracking:
        job = submit_job(head, "--working-dir", str(REPO), "--",
                         "dettune", "search", "spaces/demo.yaml", "--name", "cluster", "--trials", "2",
                         "--epochs", "2", "--tracking-uri", tracking, "--storage", str(tmp_path / "storage"),
                         "--data-root", str(synth.root))
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "succeeded" in job.stdout

        name = urllib.parse.quote("cluster")
        experiment = _mlflow_api(tracking, f"experiments/get-by-name?experiment_name={name}")["experiment"]
        runs = _mlflow_api(tracking, "runs/search", {"experiment_ids": [experiment["experiment_id"]]})["runs"]
    roles = sorted(tag["value"] for run in runs for tag in run["data"]["tags"] if tag["key"] == "dettune.role")
    assert roles == ["parent", "trial", "trial"]
    trial_metrics = [{m["key"] for m in run["data"].get("metrics", [])} for run in runs
                     if {"key": "dettune.role", "value": "trial"} in run["data"]["tags"]]
    assert all({"val/bbox_mAP", "train/loss", "train/lr"} <= keys for keys in trial_metrics)
