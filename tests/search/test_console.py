"""What a user sees on the console during and after a search: dettune's lines, none of Tune's internals."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from conftest import write_space
from mlflow.tracking import MlflowClient

from cocodata.dataset import Dataset
from tracking_names import TAG_ROLE

TUNE_INTERNALS = ["Configuration for experiment", "TensorBoard", "Experiment state snapshotting",
                  "View detailed results here", "Trial status:", "Wrote the latest version of all result files",
                  "A new study created"]


def test_search_console_shows_dettune_lines_only(tmp_path: Path, synth: Dataset) -> None:
    space_file = write_space(tmp_path / "space.yaml", synth, name="console",
                             budget={"epochs": 1, "trials": 1, "max_concurrent": 1},
                             space={"lr": {"loguniform": [0.005, 0.03]}})
    done = subprocess.run([sys.executable, "-m", "search", "search", str(space_file)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=900)
    console = done.stdout + done.stderr
    assert done.returncode == 0, console[-3000:]

    assert re.search(r"trial \w+: started .*lr=", console)
    assert re.search(r"trial \w+: epoch 1/1 val/bbox_mAP_50=", console)
    assert re.search(r"trial \w+: completed", console)
    for internal in TUNE_INTERNALS:
        assert internal not in console, f"Tune's {internal!r} reached the console"

    table = done.stdout.split("search console: best trial")[1].splitlines()
    at = next(i for i, line in enumerate(table) if line.split()[:1] == ["trial"])
    header, row = table[at], table[at + 1]
    lr = row.split()[header.split().index("lr")]
    digits = lr.split("e")[0].replace("-", "").replace(".", "").lstrip("0")
    assert 0.005 <= float(lr) <= 0.03 and len(digits) <= 3, f"lr printed as {lr}"


def test_demo_writes_its_data_once_and_searches_it_again_from_scratch(tmp_path: Path) -> None:
    """`make demo`'s command, as a user runs it twice in one folder (trials and epochs cut down)."""
    def demo() -> subprocess.CompletedProcess[str]:
        done = subprocess.run([sys.executable, "-m", "search", "demo", "--trials", "2", "--epochs", "2"],
                              cwd=tmp_path, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
        return done

    first = demo()
    assert "wrote the demo dataset to data/synth" in first.stdout
    written = (tmp_path / "data" / "synth" / "train.json").stat().st_mtime_ns
    second = demo()

    assert "wrote the demo dataset" not in second.stdout
    assert (tmp_path / "data" / "synth" / "train.json").stat().st_mtime_ns == written
    uri = re.search(r"mlflow ui --backend-store-uri (\S+)", second.stdout)
    assert uri is not None, second.stdout
    client = MlflowClient(uri.group(1))
    experiment = client.get_experiment_by_name("demo")
    assert experiment is not None
    trials = client.search_runs([experiment.experiment_id], f"tags.`{TAG_ROLE}` = 'trial'")
    assert len(trials) == 2, "the second demo starts again: only its own two trials remain"
