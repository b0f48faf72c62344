"""A Ray worker node is lost mid-trial: the trial moves to the remaining node and resumes from its checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_space
from mlflow.tracking import MlflowClient
from ray.tune import ExperimentAnalysis
from services import free_port, node_processes, ray_head, start_worker_node

from cocodata.dataset import Dataset


@pytest.mark.slow
def test_trial_moves_off_a_lost_node(tmp_path: Path, synth: Dataset, no_local_ray: None) -> None:
    # The head has 1 CPU and the worker node 1 CPU: two concurrent 1-CPU trials occupy both nodes.
    with ray_head(num_cpus=1) as head:
        port = free_port()
        start_worker_node(head, node_manager_port=port)
        space_file = write_space(tmp_path / "space.yaml", synth, name="node-loss",
                                 search={"algorithm": "grid", "seed": 0},
                                 budget={"epochs": 3, "trials": 1, "max_concurrent": 2, "max_retries": 2},
                                 space={"lr": {"grid": [0.01, 0.02]}})
        driver = subprocess.Popen(
            [sys.executable, "-m", "search", "search", str(space_file), "--address", head.gcs_address,
             "--storage", str(tmp_path / "runs")],
            cwd=tmp_path, env=head.env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert driver.stdout is not None
        seen = []
        for line in driver.stdout:  # once both trials have checkpointed epoch 1, the worker node goes away
            seen.append(line)
            if sum("epoch 1/3" in s for s in seen) == 2:
                break
        killed = node_processes(port)
        assert killed, "the worker node's raylet was not found"
        for pid in killed:
            os.kill(pid, signal.SIGKILL)
        output, _ = driver.communicate(timeout=900)
        assert driver.returncode == 0, "".join(seen) + output[-3000:]

    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("node-loss")
    runs = client.search_runs([experiment.experiment_id], "tags.`dettune.role` = 'trial'")
    assert len(runs) == 2
    for run in runs:
        assert run.data.tags["dettune.status"] == "completed"
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val/bbox_mAP")]
        assert steps == [1, 2, 3], steps
    trials = ExperimentAnalysis(str(tmp_path / "runs" / "node-loss")).trials
    assert sorted(t.run_metadata.num_failures for t in trials) == [0, 1], "the lost node's trial was not retried"
    logs = "".join(p.read_text() for p in (tmp_path / "runs" / "node-loss" / "trials").glob("*/rank0/trial.log"))
    assert "resumed epoch: 1" in logs, "the retried trial did not resume from its epoch-1 checkpoint"
