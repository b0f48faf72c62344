"""How much a search costs over training the same trials by hand.

Runs the same N trial configurations (a) directly with the trainer, one after another, and (b) through
`dettune search` with concurrency 1 and no early stopping, then prints both wall times, their ratio, and each
trial's time from its start to its first training iteration.

    .venv/bin/python bench/overhead.py [--trials 3] [--epochs 2]
"""

from __future__ import annotations

import argparse
import re
import tempfile
import time
from pathlib import Path

import yaml
from mlflow.tracking import MlflowClient

from search.driver import SearchOptions, run_search
from spaces.dataset import Dataset, open_dataset
from spaces.synth import write_dataset
from trainers.hook import FIRST_ITER_MARK
from trainers.trial import TRIAL_LOG, TrialSpec, run_trial

BASE = "mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py"
FIXED = {"backbone": "r18", "preset": "tiny", "scale": [160, 160], "optimizer": "sgd", "batch_size": 4}


def _first_iter(log: Path) -> float:
    match = re.search(rf"{FIRST_ITER_MARK} ([0-9.]+)", log.read_text())
    if match is None:
        raise RuntimeError(f"{log} has no first-iteration mark")
    return float(match.group(1))


def direct(dataset: Dataset, lrs: list[float], epochs: int, out: Path) -> tuple[float, list[float]]:
    """Trains each point with run_trial; returns the wall time and each trial's start-up time."""
    startups = []
    began = time.time()
    for i, lr in enumerate(lrs):
        work_dir = out / f"direct{i}"
        started = time.time()
        run_trial(TrialSpec(base=BASE, dataset=dataset, point={**FIXED, "lr": lr, "epochs": epochs},
                            work_dir=work_dir))
        startups.append(_first_iter(work_dir / TRIAL_LOG) - started)
    return time.time() - began, startups


def searched(dataset: Dataset, lrs: list[float], epochs: int, out: Path) -> tuple[float, list[float]]:
    """Runs the same points as a grid search; start-up counts from the trial's MLflow run creation."""
    space = {"name": "overhead", "base": BASE, "data": {"root": str(dataset.root), "train": "train.json",
             "val": "val.json"}, "budget": {"epochs": epochs, "trials": 1, "max_concurrent": 1},
             "search": {"algorithm": "grid"}, "scheduler": {"type": "none"},
             "space": {"lr": {"grid": lrs}}, "fixed": FIXED}
    space_file = out / "overhead.yaml"
    space_file.write_text(yaml.safe_dump(space))
    began = time.time()
    outcome = run_search(SearchOptions(space_file=space_file, storage=out / "runs"))
    wall = time.time() - began
    client = MlflowClient(outcome.tracking_uri)
    experiment = client.get_experiment_by_name("overhead")
    startups = []
    for run in client.search_runs([experiment.experiment_id], "tags.`dettune.role` = 'trial'"):
        log = outcome.experiment_dir / "trials" / run.data.tags["dettune.trial_id"] / "rank0" / TRIAL_LOG
        startups.append(_first_iter(log) - run.info.start_time / 1000)
    return wall, startups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    lrs = [round(0.01 * (i + 1), 4) for i in range(args.trials)]
    with tempfile.TemporaryDirectory(prefix="dettune-bench-") as tmp:
        out = Path(tmp)
        write_dataset(out / "data", images=48, size=160, seed=0)
        dataset = open_dataset(out / "data", "train.json", "val.json")
        direct_wall, direct_startups = direct(dataset, lrs, args.epochs, out)
        search_wall, search_startups = searched(dataset, lrs, args.epochs, out)
    print(f"{args.trials} trials x {args.epochs} epochs, tiny Faster R-CNN, 48 synthetic images")
    print(f"(a) trainer directly:        {direct_wall:7.1f} s")
    print(f"(b) dettune search (conc 1): {search_wall:7.1f} s   ratio b/a = {search_wall / direct_wall:.2f}")
    print("start to first iteration:    "
          f"(a) mean {sum(direct_startups) / len(direct_startups):.1f} s, "
          f"(b) mean {sum(search_startups) / len(search_startups):.1f} s "
          f"(max {max(search_startups):.1f} s)")


if __name__ == "__main__":
    main()
