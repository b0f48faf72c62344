"""The race's table of real learning curves: every configuration of a race grid trained for every epoch, per seed.

bench/race.py trains each method's trials for real, so a race of 3 seeds takes 90 minutes here and a difference
smaller than the spread over seeds (1-2 AP at the race's size) cannot be told from luck. This bench trains each
configuration of a grid once per seed instead, with the race's own trainer (dettune's trial, through Tune, 2 at a
time), lr on :data:`LR_STEPS` log-spaced values over the grid's span, and writes every epoch's val/bbox_mAP, rung
score and seconds to one JSON: bench/race_replay.py replays the race's methods over it, hundreds of seeds in
minutes.

    .venv/bin/python -m bench.race_table --out race-table    # both grids, seeds 0-4: 10 tables of ~3 min each
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.schedulers import FIFOScheduler
from ray.tune.search import BasicVariantGenerator

from bench.asha import FIXED, METRIC
from bench.race import (
    BASE,
    CONCURRENCY,
    Race,
    _load,
    grid_of,
)
from cocodata.synth import write_dataset
from search.driver import connect_ray, make_plan, quiet_tune_console, trial_resources
from search.rung import RUNG_SCORE
from search.trainable import tune_trial
from spaces.schema import Space
from trainers.metrics import EPOCH

LR_STEPS = 5
"""lr values per table: log-spaced over the grid's span, ends included (0.005 .. 0.02: steps of x1.41)."""
EPOCH_SECONDS = "time_this_iter_s"


def lr_values(race: Race) -> list[float]:
    low, high = min(grid_of(race)["lr"]["grid"]), max(grid_of(race)["lr"]["grid"])
    return [round(low * (high / low) ** (i / (LR_STEPS - 1)), 6) for i in range(LR_STEPS)]


def table_knobs(race: Race) -> dict[str, dict[str, list[Any]]]:
    return {**grid_of(race), "lr": {"grid": lr_values(race)}}


def table_space(race: Race) -> Space:
    """The grid with lr on :func:`lr_values`, every configuration for every epoch (a grid search, no ASHA stops:
    the asha section only makes the trials report the rung score)."""
    knobs = table_knobs(race)
    return Space.from_json({
        "name": f"table-{race.grid}", "base": BASE, "metric": METRIC,
        "data": {"root": str(race.data), "train": "train.json", "val": "val.json"},
        "budget": {"epochs": race.epochs, "trials": 1, "max_concurrent": CONCURRENCY, "cpus_per_worker": 1},
        "search": {"algorithm": "grid", "seed": race.seed},
        "scheduler": {"type": "asha"},
        "space": knobs, "fixed": {knob: value for knob, value in FIXED.items() if knob not in knobs},
    }, "race table")


def train_table(race: Race) -> list[dict[str, Any]]:
    """Each configuration's curve: its knobs, and per epoch the mAP, the rung score and the seconds it took (a
    diverged trial's curve ends with its last epoch)."""
    space = table_space(race)
    plan = make_plan(space, race.work)
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(tune_trial, plan=plan), trial_resources(plan)),
        param_space=space.tune_param_space(),
        tune_config=tune.TuneConfig(search_alg=BasicVariantGenerator(max_concurrent=CONCURRENCY),
                                    scheduler=FIFOScheduler(), num_samples=1, reuse_actors=True),
        run_config=tune.RunConfig(name=space.name, storage_path=str(race.work), verbose=0))
    curves = []
    for result in tuner.fit():
        if result.error is not None:
            raise RuntimeError(f"{result.config}: {result.error}")
        # Fewer epochs than asked: the trial diverged (its loss NaN) and ended itself, as it would in the race.
        rows = result.metrics_dataframe.sort_values(EPOCH).to_dict("records")
        curves.append({"config": {knob: result.config[knob] for knob in grid_of(race)},
                       "values": [row[METRIC] for row in rows], "scores": [row[RUNG_SCORE] for row in rows],
                       "seconds": [row[EPOCH_SECONDS] for row in rows]})
    return curves


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for table.json")
    parser.add_argument("--grids", nargs="+", default=["heads", "scales"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--images", type=int, default=48)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "table.json"
    tables = json.loads(path.read_text()) if path.is_file() else []  # an interrupted run goes on
    print(f"load at start: {_load()} ({time.strftime('%H:%M:%S')})", flush=True)
    connect_ray(None)
    quiet_tune_console()
    with tempfile.TemporaryDirectory(prefix="dettune-race-table-") as tmp:
        data = Path(tmp) / "data"
        write_dataset(data, images=args.images, size=160, seed=0)
        for grid, seed in itertools.product(args.grids, args.seeds):
            if any(t["grid"] == grid and t["seed"] == seed for t in tables):
                continue
            race = Race(data, Path(tmp) / grid / f"seed{seed}", grid, seed, args.epochs, budget=0)
            began = time.time()
            curves = train_table(race)
            tables.append({"grid": grid, "seed": seed, "epochs": args.epochs, "images": args.images,
                           "lr": lr_values(race), "curves": curves})
            path.write_text(json.dumps(tables))
            best = max(max(c["values"]) for c in curves)
            print(f"{grid} seed {seed}: {len(curves)} configurations, best {best * 100:.2f} AP, "
                  f"{time.time() - began:.0f} s, load {_load()}", flush=True)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
