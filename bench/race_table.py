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
import math
import tempfile
import time
from pathlib import Path
from typing import Any

from ray.tune.schedulers import FIFOScheduler
from ray.tune.search import BasicVariantGenerator

from bench.asha import METRIC
from bench.race import CONCURRENCY, Race, grid_of, machine_load, space_of, tune_run
from cocodata.synth import write_dataset
from search.driver import connect_ray, quiet_tune_console
from search.rung import RUNG_SCORE
from spaces.schema import Space
from trainers.metrics import EPOCH

LR_STEPS = 5
"""lr values per table: log-spaced over the grid's span, ends included (0.005 .. 0.02: steps of x1.41)."""
EPOCH_SECONDS = "time_this_iter_s"


def lr_values(race: Race) -> list[float]:
    low, high = min(grid_of(race)["lr"]["grid"]), max(grid_of(race)["lr"]["grid"])
    return [round(low * (high / low) ** (i / (LR_STEPS - 1)), 6) for i in range(LR_STEPS)]


def table_race(race: Race) -> tuple[Race, Space]:
    """The race with a budget of every epoch of every configuration, and its grid with lr on :func:`lr_values` as a
    grid search (its asha section only makes the trials report the rung score: no scheduler stops one)."""
    grid = {**grid_of(race), "lr": {"grid": lr_values(race)}}
    configurations = math.prod(len(d.get("grid") or d["choice"]) for d in grid.values())
    race = Race(race.data, race.work, race.grid, race.seed, race.epochs, budget=configurations * race.epochs)
    return race, space_of(race, f"table-{race.grid}", "grid", grid)


def train_table(race: Race) -> list[dict[str, Any]]:
    """Each configuration's curve: its knobs, and per epoch the mAP, the rung score and the seconds it took (a
    diverged trial's curve ends with its last epoch)."""
    race, space = table_race(race)
    results = tune_run(race, space, search_alg=BasicVariantGenerator(max_concurrent=CONCURRENCY),
                       scheduler=FIFOScheduler(), samples=1, param_space=space.tune_param_space(),
                       log=race.work / "events.jsonl", began=time.time())
    curves = []
    for result in results:
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
    print(f"load at start: {machine_load()} ({time.strftime('%H:%M:%S')})", flush=True)
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
                  f"{time.time() - began:.0f} s, load {machine_load()}", flush=True)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
