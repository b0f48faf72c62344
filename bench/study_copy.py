"""What the study copy for optuna-dashboard and the report's importances cost at a search's real size.

The driver copies each finished trial into the Optuna storage (search/optuna_search.py ``StudyMirror``);
``dettune report`` fits fANOVA over the finished trials (results/importance.py). Both are timed here at up to
1,000 trials of a three-knob space; the trials are told to an in-memory study with a synthetic score (a stand-in
for the searcher's trials: what is measured is the copy and the fit, not training).

    .venv/bin/python bench/study_copy.py [--trials 1000] [--storage sqlite:///PATH]   # default: a temp SQLite
"""

from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import optuna

from results.importance import knob_importances
from results.store import Point, TrialRecord
from search.optuna_search import TRIAL_ATTR, StudyMirror
from search.tracking import TrackingSettings
from spaces.knobs import param_text
from spaces.schema import Space

SPACE = {"lr": {"loguniform": [0.001, 0.1]}, "scale": {"choice": [[128, 128], [160, 160]]},
         "schedule": {"choice": ["step", "cosine"]}}


def _space(trials: int) -> Space:
    return Space.from_json({"name": "copy-bench", "base": "mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py",
                            "data": {"root": "data/synth", "train": "train.json", "val": "val.json"},
                            "budget": {"epochs": 2, "trials": trials}, "search": {"algorithm": "tpe", "seed": 0},
                            "space": SPACE, "fixed": {"backbone": "r18"}})


def _score(lr: float) -> float:
    return 0.3 - 0.05 * (math.log10(lr) + 2) ** 2 + random.gauss(0, 0.005)


def time_copy(space: Space, trials: int, storage: str | None, folder: Path) -> list[float]:
    """Seconds each finished trial's copy took, in order."""
    settings = folder / space.name / "search.json"
    settings.parent.mkdir(parents=True)
    TrackingSettings(study_uri=storage).save(settings)
    mirror = StudyMirror(settings, space, fresh=True)
    study = optuna.create_study(direction="maximize")
    seconds = []
    for number in range(trials):
        trial = study.ask(space.optuna_space())
        trial.set_user_attr(TRIAL_ATTR, f"t{number}")
        finished = study.tell(trial, _score(trial.params["lr"]))
        start = time.perf_counter()
        mirror.add([finished])
        seconds.append(time.perf_counter() - start)
    return seconds


def time_importances(space: Space, trials: int) -> float:
    records = []
    for number in range(trials):
        lr = 10 ** random.uniform(-3, -1)
        params = {"lr": str(lr), "scale": param_text(random.choice([[128, 128], [160, 160]])),
                  "schedule": random.choice(["step", "cosine"])}
        records.append(TrialRecord(run_id=str(number), exp_num=str(number), trial_id=str(number),
                                   status="completed", stopped_at=None, failure=None, lb_note=None, params=params,
                                   history={space.metric: [Point(1, _score(lr), 0)]}))
    start = time.perf_counter()
    knob_importances(space, records)
    return time.perf_counter() - start


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=1000)
    parser.add_argument("--storage", help="an Optuna storage URL (default: SQLite in a temp folder)")
    args = parser.parse_args(argv)
    random.seed(0)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    print(f"load {os.getloadavg()[0]:.1f}; {args.trials} trials; storage {args.storage or 'SQLite (temp)'}")
    space = _space(args.trials)
    with tempfile.TemporaryDirectory(prefix="study-copy-") as folder:
        seconds = time_copy(space, args.trials, args.storage, Path(folder))
    quarter = max(1, len(seconds) // 4)
    for start in range(0, len(seconds), quarter):
        chunk = seconds[start:start + quarter]
        print(f"  copy, trials {start + 1}-{start + len(chunk)}: median {1000 * statistics.median(chunk):.1f} ms, "
              f"max {1000 * max(chunk):.1f} ms per finished trial")
    print(f"  copy, whole search: {sum(seconds):.1f} s of driver time")
    for count in sorted({12, 100, args.trials}):
        print(f"  importances (fANOVA) over {count} trials: {time_importances(space, count):.2f} s")


if __name__ == "__main__":
    main()
