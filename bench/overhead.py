"""How much a search costs over training the same trials by hand, and where the extra seconds go.

Runs the same N trial configurations (a) directly with the trainer, one after another, and (b) through
`dettune search` with concurrency 1 and no early stopping, then prints both wall times, their ratio, each
trial's time from its start to its first training iteration, and a breakdown of the search's extra time:
the driver's own steps (timed around the driver's functions), each trial's start-up, the gaps between
trials, and what each epoch after the first costs beyond the same epoch trained directly.

    .venv/bin/python bench/overhead.py [--trials 3] [--epochs 2] [--images 48]

``--images 720`` makes each trial about a minute long on a 2-core machine.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import yaml
from mlflow.tracking import MlflowClient
from ray.tune.execution.experiment_state import _ExperimentCheckpointManager

from cocodata.dataset import Dataset, open_dataset
from cocodata.synth import write_dataset
from search import driver, staging
from search.callbacks import ConsoleCallback, MlflowCallback
from search.driver import SearchOptions, run_search
from search.tracking import Tracker, TrackingSettings
from trainers.hook import FIRST_ITER_MARK
from trainers.trial import TRIAL_LOG, TrialSpec, run_trial

BASE = "mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py"
FIXED = {"backbone": "r18", "preset": "tiny", "scale": [160, 160], "optimizer": "sgd", "batch_size": 4}
TRIAL_CPUS = 1
"""A trial's CPUs, the space's default: the search's trials and the direct run train on this many threads."""
DRIVER_STEPS = {f"driver: {name.strip('_')}": (driver, name) for name in (
    "check_reachable", "load_for_search", "check_space", "connect_ray", "check_cluster", "_save", "_tuner",
    "reconcile", "_record_best", "results_table")} | {
    "driver: stage_from_store": (staging, "stage_from_store"),
    "driver: open the MLflow store": (TrackingSettings, "tracker"),
    "driver: describe_search": (Tracker, "describe_search")}
"""The driver's steps around Tune's fit, in order."""
IN_FIT = {"Tune: experiment snapshots": (_ExperimentCheckpointManager, "sync_up_experiment_state"),
          "MLflow callback on results": (MlflowCallback, "on_trial_result"),
          "console callback on results": (ConsoleCallback, "on_trial_result")}
"""Driver-side work inside fit that a trial waits for: Tune holds a trial after each report until its driver
has processed the result (synchronous reporting), so these seconds add to the trial's epochs."""


def _first_iter(log: Path) -> float:
    match = re.search(rf"{FIRST_ITER_MARK} ([0-9.]+)", log.read_text())
    if match is None:
        raise RuntimeError(f"{log} has no first-iteration mark")
    return float(match.group(1))


def direct(dataset: Dataset, lrs: list[float], epochs: int, out: Path) -> tuple[float, list[float], list[float]]:
    """Trains each point with run_trial; returns the wall time, each trial's start-up and its later epochs' times.

    With the compute a search trial gets: Ray gives a 1-CPU trial one thread (``OMP_NUM_THREADS=1``), so the
    direct run uses one too; with two on two busy cores the comparison would measure thread contention."""
    torch.set_num_threads(TRIAL_CPUS)
    startups: list[float] = []
    epoch_times: list[float] = []
    began = time.time()
    for i, lr in enumerate(lrs):
        work_dir = out / f"direct{i}"
        reported: list[float] = []
        started = time.time()
        run_trial(TrialSpec(base=BASE, dataset=dataset, point={**FIXED, "lr": lr, "epochs": epochs},
                            work_dir=work_dir), report=_stamping(reported))
        startups.append(_first_iter(work_dir / TRIAL_LOG) - started)
        epoch_times += [later - earlier for earlier, later in zip(reported, reported[1:], strict=False)]
    return time.time() - began, startups, epoch_times


def _stamping(times: list[float]) -> Callable[[dict[str, float], Path], None]:
    """A report callback that notes when each epoch was reported."""
    return lambda row, checkpoint: times.append(time.time())


@contextmanager
def _timed(targets: dict[str, tuple[Any, str]]) -> Iterator[dict[str, float]]:
    """Wraps each target function so its total seconds land in the yielded dict under its label."""
    spent: dict[str, float] = defaultdict(float)
    originals = {label: getattr(owner, name) for label, (owner, name) in targets.items()}

    def timed(label: str, function: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                spent[label] += time.perf_counter() - started
        return wrapper

    for label, (owner, name) in targets.items():
        setattr(owner, name, timed(label, originals[label]))
    try:
        yield spent
    finally:
        for label, (owner, name) in targets.items():
            setattr(owner, name, originals[label])


def searched(dataset: Dataset, lrs: list[float], epochs: int, out: Path) -> dict[str, Any]:
    """Runs the same points as a grid search; start-up counts from the trial's MLflow run creation."""
    space = {"name": "overhead", "base": BASE, "data": {"root": str(dataset.root), "train": "train.json",
             "val": "val.json"}, "budget": {"epochs": epochs, "trials": 1, "max_concurrent": 1},
             "search": {"algorithm": "grid"}, "scheduler": {"type": "none"},
             "space": {"lr": {"grid": lrs}}, "fixed": FIXED}
    space_file = out / "overhead.yaml"
    space_file.write_text(yaml.safe_dump(space))
    began = time.time()
    with _timed(DRIVER_STEPS | IN_FIT) as steps:
        outcome = run_search(SearchOptions(space_file=space_file, storage=out / "runs"))
    wall = time.time() - began
    client = MlflowClient(outcome.tracking_uri)
    experiment = client.get_experiment_by_name("overhead")
    runs = sorted(client.search_runs([experiment.experiment_id], "tags.`dettune.role` = 'trial'"),
                  key=lambda run: run.info.start_time)
    startups, epoch_times = [], []
    for run in runs:
        trial_id = run.data.tags["dettune.trial_id"]
        log = outcome.experiment_dir / "trials" / trial_id / "rank0" / TRIAL_LOG
        startups.append(_first_iter(log) - run.info.start_time / 1000)
        epoch_times += _later_epoch_times(outcome.experiment_dir, trial_id)
    gaps = [(later.info.start_time - earlier.info.end_time) / 1000
            for earlier, later in zip(runs, runs[1:], strict=False)]
    ends = {"to the first trial": runs[0].info.start_time / 1000 - began,
            "after the last trial": began + wall - runs[-1].info.end_time / 1000}
    return {"wall": wall, "startups": startups, "epoch_times": epoch_times, "gaps": gaps, "steps": dict(steps),
            "ends": ends}


def _later_epoch_times(experiment_dir: Path, trial_id: str) -> list[float]:
    """Seconds between a trial's reports after its first, as Ray Tune timed them inside the trial."""
    (result_file,) = experiment_dir.glob(f"*{trial_id}*/result.json")
    rows = [json.loads(line) for line in result_file.read_text().splitlines() if line.strip()]
    return [row["time_this_iter_s"] for row in rows[1:]]


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def breakdown(direct_run: tuple[float, list[float], list[float]], search: dict[str, Any]) -> list[tuple[str, float]]:
    """The search's extra seconds by where they are spent; the remainder is what no row accounts for.

    The ``of which`` rows are parts of the rows above them; the two spans overlap the driver rows."""
    direct_wall, direct_startups, direct_epochs = direct_run
    steps = search["steps"]
    rows = [(label, steps.get(label, 0.0)) for label in DRIVER_STEPS]
    rows += [("trials: start-up beyond direct (sum)", sum(search["startups"]) - sum(direct_startups)),
             ("trials: gaps between trials (sum)", sum(search["gaps"])),
             ("epochs after the first, beyond direct (sum)", sum(search["epoch_times"]) - sum(direct_epochs))]
    accounted = sum(value for _, value in rows)
    rows.append(("rest (first epochs, Tune's start and end)", search["wall"] - direct_wall - accounted))
    rows += [(f"  of which in fit: {label}", steps.get(label, 0.0)) for label in IN_FIT]
    rows += [("span: search start to the first trial's run", search["ends"]["to the first trial"]),
             ("span: the last trial's end to the search's return", search["ends"]["after the last trial"])]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--images", type=int, default=48, help="synthetic images, a quarter for validation")
    args = parser.parse_args()
    lrs = [round(0.01 * (i + 1), 4) for i in range(args.trials)]
    with tempfile.TemporaryDirectory(prefix="dettune-bench-") as tmp:
        out = Path(tmp)
        write_dataset(out / "data", images=args.images, size=160, seed=0)
        dataset = open_dataset(out / "data", "train.json", "val.json")
        direct_run = direct(dataset, lrs, args.epochs, out)
        search = searched(dataset, lrs, args.epochs, out)
    direct_wall, direct_startups, direct_epochs = direct_run
    print(f"{args.trials} trials x {args.epochs} epochs, tiny Faster R-CNN, {args.images} synthetic images")
    print(f"(a) trainer directly:        {direct_wall:7.1f} s")
    print(f"(b) dettune search (conc 1): {search['wall']:7.1f} s   ratio b/a = {search['wall'] / direct_wall:.2f}")
    print(f"start to first iteration:    (a) mean {_mean(direct_startups):.1f} s, (b) mean "
          f"{_mean(search['startups']):.1f} s, each: {', '.join(f'{s:.1f}' for s in search['startups'])} s")
    print(f"an epoch after the first:    (a) mean {_mean(direct_epochs):.2f} s, (b) mean "
          f"{_mean(search['epoch_times']):.2f} s")
    print("where (b)'s extra seconds go:")
    for name, seconds in breakdown(direct_run, search):
        print(f"  {name:<46} {seconds:7.2f} s")


if __name__ == "__main__":
    main()
