"""A Ray worker node is lost mid-trial: the trial moves to the remaining node and resumes from its checkpoint."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import pytest
from conftest import write_space
from mlflow.tracking import MlflowClient
from ray.tune import ExperimentAnalysis
from services import free_port, node_processes, ray_head, start_worker_node

from cocodata.dataset import Dataset

EPOCHS = 4
KILL_AFTER_EPOCH = 2
"""The driver has shown this epoch of the lost node's trial: the checkpoint of the epoch before is registered
(Tune handles a trial's results in order), and the trial still has epochs to train."""


@pytest.mark.slow
def test_trial_moves_off_a_lost_node(tmp_path: Path, synth: Dataset, no_local_ray: None) -> None:
    # The head has 1 CPU and the worker node 1 CPU: two concurrent 1-CPU trials occupy both nodes.
    runs = tmp_path / "runs"
    with ray_head(num_cpus=1) as head:
        port = free_port()
        start_worker_node(head, node_manager_port=port)
        space_file = write_space(tmp_path / "space.yaml", synth, name="node-loss",
                                 search={"algorithm": "grid", "seed": 0},
                                 budget={"epochs": EPOCHS, "trials": 1, "max_concurrent": 2, "max_retries": 2},
                                 space={"lr": {"grid": [0.01, 0.02]}})
        driver = subprocess.Popen(
            [sys.executable, "-m", "search", "search", str(space_file), "--address", head.gcs_address,
             "--storage", str(runs)],
            cwd=tmp_path, env=head.env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert driver.stdout is not None
        seen: list[str] = []
        lost = _trial_shown_at_epoch_on_node(driver.stdout, seen, runs / "node-loss", port)
        killed = node_processes(port)
        for pid in killed:
            os.kill(pid, signal.SIGKILL)
        output, _ = driver.communicate(timeout=900)
        assert driver.returncode == 0, "".join(seen) + output[-3000:]

    client = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("node-loss")
    assert experiment is not None
    trial_runs = client.search_runs([experiment.experiment_id], "tags.`dettune.role` = 'trial'")
    assert len(trial_runs) == 2
    for run in trial_runs:
        assert run.data.tags["dettune.status"] == "completed"
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val/bbox_mAP")]
        assert steps == list(range(1, EPOCHS + 1)), steps
    trials = ExperimentAnalysis(str(runs / "node-loss")).trials
    failures = {t.trial_id: t.run_metadata.num_failures for t in trials}
    assert failures[lost] == 1 and sum(failures.values()) == 1, f"only the lost node's trial is retried: {failures}"
    log = (runs / "node-loss" / "trials" / lost / "rank0" / "trial.log").read_text()
    resumed = [int(epoch) for epoch in re.findall(r"resumed epoch: (\d+)", log)]
    assert resumed and resumed[-1] >= KILL_AFTER_EPOCH - 1, f"the retried trial restarted: resumed at {resumed}"


def _trial_shown_at_epoch_on_node(lines: Iterable[str], seen: list[str], experiment: Path, port: int) -> str:
    """Reads the driver's console until it shows KILL_AFTER_EPOCH of the trial running on the worker node;
    returns that trial's id."""
    shown = re.compile(rf"trial (\S+): epoch {KILL_AFTER_EPOCH}/{EPOCHS} ")
    for line in lines:
        seen.append(line)
        match = shown.search(line)
        if match and (experiment / "trials" / match.group(1) / "rank0" / "trial.log").resolve() in _open_files(port):
            return match.group(1)
    raise AssertionError(f"the worker node's trial never reached epoch {KILL_AFTER_EPOCH}:\n" + "".join(seen))


def _open_files(port: int) -> set[Path]:
    """What the worker node's processes hold open: a trial holds its trial.log while it trains."""
    links = (fd for pid in node_processes(port) for fd in Path(f"/proc/{pid}/fd").glob("*"))
    held = set()
    for link in links:
        with contextlib.suppress(OSError):  # a process or descriptor gone meanwhile
            held.add(Path(os.readlink(link)))
    return held
