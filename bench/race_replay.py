"""The anytime race replayed over real learning curves: each method over hundreds of seeds, in minutes.

bench/race.py trains every trial of every method for real: 3 seeds take 90 minutes here, and at the race's size
(48 images, 4 epochs, mAPs of 1-8 AP) the spread over seeds (1-2 AP) hides any smaller difference between methods.
Here training is a stand-in: each trial's epochs are read from bench/race_table.py's table, where every
configuration of the grid (lr on 5 log-spaced values) was trained for every epoch by the race's trainer, once per
training seed. Everything that decides is real: dettune's searcher and RecheckedASHA as run_search builds them,
Ray Tune's ``ASHAScheduler()`` and its random sampling (its search-space domains' own ``sample``) and grid order
(``generate_variants``), Optuna's TPE with its ``HyperbandPruner`` and ``MedianPruner`` through ask/tell, the race's
PASHA and top-K. Two trials run at a time on a simulated clock that advances by each epoch's measured seconds; the
run stops at the race's budget of epochs, every reported epoch counted (as bench/race.py counts them).

What the stand-in changes: a sampled lr trains as the nearest of the table's 5 (in log space), so the searchers
see a continuous lr and the trainer a 5-step one; a configuration trained twice with one training seed gives the
same curve (a real rerun differs a little: cuDNN-free CPU training is nearly deterministic); Optuna's two processes
on one study become one study asked in turn. Replay seed ``s`` reads the table of training seed ``s mod`` the
table's seeds and seeds every sampler with ``s``.

    .venv/bin/python -m bench.race_replay --table race-table/table.json                 # 1,000 seeds
    .venv/bin/python -m bench.race_replay --table race-table/table.json --methods dettune-startup-10 tpe-no-asha

It prints per grid and method the best val/bbox_mAP at 25/50/100 % of the budget (mean ± standard error over the
seeds) and, against ``--reference`` (dettune's default), the mean paired difference and the seeds it wins or ties.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Protocol, cast

import numpy as np
import optuna
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search.variant_generator import generate_variants

from bench.asha import METRIC
from bench.race import CONCURRENCY, PASHA, PRUNERS, SHARES, Event, Race, Run, machine_load, space_of, top_k_split
from search.driver import make_scheduler, make_searcher
from search.optuna_search import ObjectiveSearch, tpe_startup_trials
from search.rung import RUNG_SCORE, RecheckedASHA
from spaces.schema import Space
from trainers.metrics import EPOCH

NO_CONTROLLER: Any = None  # the schedulers replayed decide from the trial and its result alone


@dataclass(frozen=True)
class Curve:
    """One configuration's epochs as the table recorded them."""

    values: list[float]
    scores: list[float]
    seconds: list[float]


@dataclass(frozen=True)
class Table:
    """Every configuration of one grid, trained with one training seed."""

    grid: str
    seed: int
    epochs: int
    lr: list[float]
    curves: dict[str, Curve] = field(repr=False)

    def curve(self, config: dict[str, Any]) -> Curve:
        """The curve of ``config``'s knobs, its lr taken as the table's nearest in log space."""
        return self.curves[self.key(config)]

    def key(self, config: dict[str, Any]) -> str:
        lr = min(self.lr, key=lambda value: abs(math.log(value / config["lr"])))
        return json.dumps({**{knob: config[knob] for knob in self.knobs}, "lr": lr}, sort_keys=True)

    @cached_property
    def knobs(self) -> set[str]:
        """The grid's knobs, as every configuration of the table names them."""
        return set(json.loads(next(iter(self.curves))))


def read_tables(path: Path) -> list[Table]:
    tables = []
    for saved in json.loads(path.read_text()):
        table = Table(saved["grid"], saved["seed"], saved["epochs"], saved["lr"], {})
        for curve in saved["curves"]:
            table.curves[json.dumps(curve["config"], sort_keys=True)] = Curve(
                curve["values"], curve["scores"], curve["seconds"])
        tables.append(table)
    return tables


class Method(Protocol):
    """A search as the replay drives it: a configuration for each new trial, a decision after each epoch."""

    def ask(self) -> tuple[str, dict[str, Any]] | None:
        """A new trial's id and its knobs; None when the method starts nothing now."""

    def tell(self, trial: str, row: dict[str, float], last: bool) -> bool:
        """The trial's epoch ``row`` (``last``: its final epoch, or the last before it diverged); whether it goes
        on."""


class RandomSampling:
    """Tune's random search: each knob drawn by its search-space domain's own ``sample``."""

    def __init__(self, space: Space, seed: int) -> None:
        self._domains, self._state = space.tune_param_space(), np.random.RandomState(seed)

    def suggest(self, trial: str) -> dict[str, Any]:
        return {knob: domain.sample(random_state=self._state) for knob, domain in self._domains.items()}


class GridOrder:
    """Tune's grid: every combination once, in the order its variant generator makes them."""

    def __init__(self, space: Space) -> None:
        self._configs = iter([spec for _, spec in generate_variants(space.tune_param_space())])

    def suggest(self, trial: str) -> dict[str, Any] | None:
        return next(self._configs, None)


class TuneMethod:
    """A searcher (a Tune Searcher, or :class:`RandomSampling`/:class:`GridOrder`) and a Tune scheduler, called as
    Tune's controller calls them: the scheduler decides on each result first; a result it lets go on reaches the
    searcher's ``on_trial_result``, the one it stops on reaches ``on_trial_complete``."""

    def __init__(self, space: Space, searcher: Any, scheduler: TrialScheduler, samples: float) -> None:
        self._space, self._searcher, self._scheduler, self._left = space, searcher, scheduler, samples
        self._count = 0

    def ask(self) -> tuple[str, dict[str, Any]] | None:
        if self._left <= 0:
            return None
        trial = f"trial{self._count:04d}"
        params = self._searcher.suggest(trial)
        if params is None:
            return None
        self._count, self._left = self._count + 1, self._left - 1
        self._scheduler.on_trial_add(NO_CONTROLLER, SimpleNamespace(trial_id=trial))
        return trial, self._space.point(params)

    def tell(self, trial: str, row: dict[str, float], last: bool) -> bool:
        stub, result = SimpleNamespace(trial_id=trial), {**row, "training_iteration": row[EPOCH]}
        stop = self._scheduler.on_trial_result(NO_CONTROLLER, stub, result) == TrialScheduler.STOP or last
        if not stop:
            if hasattr(self._searcher, "on_trial_result"):
                self._searcher.on_trial_result(trial, result)
            return True
        self._scheduler.on_trial_complete(NO_CONTROLLER, stub, result)
        if hasattr(self._searcher, "on_trial_complete"):
            self._searcher.on_trial_complete(trial, result)
        return False


class OptunaAlone:
    """Optuna's ``TPESampler`` (seeded) and a pruner at its defaults, by ask/tell, reporting every epoch."""

    def __init__(self, space: Space, pruner: str, seed: int) -> None:
        self._space, self._asked = space, {}
        self._distributions = space.optuna_space()
        self._study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed),
                                          pruner=PRUNERS[pruner]())

    def ask(self) -> tuple[str, dict[str, Any]]:
        trial = self._study.ask(self._distributions)
        self._asked[str(trial.number)] = trial
        return str(trial.number), self._space.point(trial.params)

    def tell(self, trial: str, row: dict[str, float], last: bool) -> bool:
        asked = self._asked[trial]
        asked.report(row[METRIC], int(row[EPOCH]))
        if last and row[EPOCH] < self._space.budget.epochs:  # diverged: the race's objective raised, caught as FAIL
            self._study.tell(asked, state=optuna.trial.TrialState.FAIL)
            return False
        if last:
            self._study.tell(asked, row[METRIC])
            return False
        if asked.should_prune():
            self._study.tell(asked, state=optuna.trial.TrialState.PRUNED)
            return False
        return True


class TopKAfterOneEpoch:
    """N random configurations one epoch each, then the K best by that epoch's rung score for every epoch."""

    def __init__(self, space: Space, race: Race) -> None:
        (self._n, self._k), self._space = top_k_split(race), space
        self._random = RandomSampling(space, race.seed)
        self._first: dict[str, tuple[dict[str, Any], float | None]] = {}
        self._second: list[dict[str, Any]] | None = None

    def ask(self) -> tuple[str, dict[str, Any]] | None:
        if len(self._first) < self._n:
            trial = f"first{len(self._first):03d}"
            self._first[trial] = (self._space.point(self._random.suggest(trial)), None)
            return trial, self._first[trial][0]
        if any(score is None for _, score in self._first.values()):
            return None  # the K best are known once every first epoch is
        if self._second is None:
            ranked = sorted(self._first.values(), key=lambda told: told[1] or 0.0, reverse=True)
            self._second = [config for config, _ in ranked[:self._k]]
        return (f"second{len(self._second):03d}", self._second.pop(0)) if self._second else None

    def tell(self, trial: str, row: dict[str, float], last: bool) -> bool:
        if trial in self._first:
            self._first[trial] = (self._first[trial][0], row[RUNG_SCORE])
            return False
        return not last


MethodMaker = Callable[[Race], Method]


def _dettune(race: Race) -> Method:
    space = space_of(race, "dettune", "tpe")
    searcher, _, samples = make_searcher(space)
    return TuneMethod(space, searcher, make_scheduler(space), samples)


def _tune_default(race: Race) -> Method:
    space = space_of(race, "tune", "random")
    return TuneMethod(space, RandomSampling(space, race.seed), _ray_asha(METRIC), space.budget.trials)


def _grid(race: Race) -> Method:
    space = space_of(race, "grid", "grid")
    return TuneMethod(space, GridOrder(space), FIFOScheduler(), math.inf)


def _pasha(race: Race) -> Method:
    space = space_of(race, "pasha", "random")
    return TuneMethod(space, RandomSampling(space, race.seed),
                      PASHA(time_attr=EPOCH, metric=RUNG_SCORE, mode="max", max_t=race.epochs), space.budget.trials)


def _tpe_variant(race: Race, *, scheduler: TrialScheduler | None = None, centre_first: bool = False,
                 **tpe: Any) -> Method:
    """dettune's searcher with other TPE settings (its own start-up count unless given), another scheduler, or its
    first trial at the space's centre (each choice's first value, each range's middle: log-middle for a log range),
    as a grid's order starts there."""
    space = space_of(race, "variant", "tpe")
    tpe = {"n_startup_trials": tpe_startup_trials(space.budget.trials), **tpe}
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=race.seed, **tpe))
    if centre_first:
        study.enqueue_trial({knob: _centre(dist) for knob, dist in space.optuna_space().items()})
    return TuneMethod(space, ObjectiveSearch(space, study=study), scheduler or make_scheduler(space),
                      space.budget.trials)


def _centre(dist: optuna.distributions.BaseDistribution) -> Any:
    if isinstance(dist, optuna.distributions.FloatDistribution):
        return math.sqrt(dist.low * dist.high) if dist.log else (dist.low + dist.high) / 2
    return cast(optuna.distributions.CategoricalDistribution, dist).choices[0]


def _rechecked(race: Race, grace: int, factor: int, metric: str = RUNG_SCORE) -> RecheckedASHA:
    """dettune's scheduler at other settings (or ranking the mAP itself, ties going on)."""
    return RecheckedASHA(time_attr=EPOCH, metric=metric, mode="max", max_t=race.epochs, grace_period=grace,
                         reduction_factor=factor)


def _ray_asha(metric: str) -> ASHAScheduler:
    """Ray's ``ASHAScheduler()`` as Tune's default race method runs it."""
    scheduler = ASHAScheduler()
    scheduler.set_search_properties(metric, "max")
    return scheduler


METHODS: dict[str, MethodMaker] = {
    "dettune": _dettune, "tune-random-asha": _tune_default,
    "optuna-tpe-hyperband": lambda race: OptunaAlone(space_of(race, "o", "tpe"), "hyperband", race.seed),
    "optuna-tpe-median": lambda race: OptunaAlone(space_of(race, "o", "tpe"), "median", race.seed),
    "grid": _grid, "pasha": _pasha,
    "top-k-1-epoch": lambda race: TopKAfterOneEpoch(space_of(race, "top-k", "random"), race),
}
VARIANTS: dict[str, MethodMaker] = {  # dettune's default with one thing changed: what README's replay compares
    "dettune-startup-10": lambda race: _tpe_variant(race, n_startup_trials=10),  # before: Optuna's default
    "tpe-startup-3": lambda race: _tpe_variant(race, n_startup_trials=3),
    "tpe-startup-8": lambda race: _tpe_variant(race, n_startup_trials=8),
    "tpe-centre-first": lambda race: _tpe_variant(race, centre_first=True),
    "tpe-no-asha": lambda race: _tpe_variant(race, scheduler=FIFOScheduler()),
    "tpe-ray-asha": lambda race: _tpe_variant(race, scheduler=_ray_asha(METRIC)),
    "dettune-asha-1:2": lambda race: _tpe_variant(race, scheduler=_rechecked(race, 1, 2)),
    "dettune-asha-1:4": lambda race: _tpe_variant(race, scheduler=_rechecked(race, 1, 4)),
    "dettune-asha-2:3": lambda race: _tpe_variant(race, scheduler=_rechecked(race, 2, 3)),
    "dettune-asha-on-map": lambda race: _tpe_variant(race, scheduler=_rechecked(race, 1, 3, METRIC)),
}


@dataclass
class _Running:
    trial: str
    curve: Curve
    epochs: int
    ends: float


def replay(method: Method, table: Table, budget: int) -> list[Event]:
    """The counted epochs of ``method``'s search over ``table``, 2 trials at a time, until ``budget`` are counted."""
    clock, running, events = 0.0, list[_Running](), list[Event]()

    def fill() -> None:
        while len(running) < CONCURRENCY and (asked := method.ask()) is not None:
            trial, config = asked
            curve = table.curve(config)
            running.append(_Running(trial, curve, 0, clock + curve.seconds[0]))

    fill()
    while running and len(events) < budget:
        now = min(running, key=lambda r: r.ends)
        clock, now.epochs = now.ends, now.epochs + 1
        row = {EPOCH: now.epochs, METRIC: now.curve.values[now.epochs - 1],
               RUNG_SCORE: now.curve.scores[now.epochs - 1]}
        events.append(Event(now.trial, now.epochs, row[METRIC], clock, row[RUNG_SCORE]))
        if method.tell(now.trial, row, last=now.epochs == len(now.curve.values)):
            now.ends = clock + now.curve.seconds[now.epochs]
        else:
            running.remove(now)
            fill()
    return events


def race_replay(tables: list[Table], makers: dict[str, MethodMaker], seeds: int, budget: int) -> list[Run]:
    runs = []
    for grid in dict.fromkeys(table.grid for table in tables):
        mine = sorted((t for t in tables if t.grid == grid), key=lambda t: t.seed)
        for seed, (name, maker) in itertools.product(range(seeds), makers.items()):
            table = mine[seed % len(mine)]
            race = Race(Path("."), Path("."), grid, seed, table.epochs, budget)
            events = replay(maker(race), table, budget)
            runs.append(Run(name, grid, seed, budget, events, wall=events[-1].seconds if events else 0.0))
    return runs


def _mean_se(values: list[float], *, signed: bool = False) -> str:
    """The mean ± its standard error, in AP."""
    spread = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return f"{statistics.mean(values) * 100:{'+' if signed else ''}5.2f} ± {spread * 100:4.2f}"


def summary(runs: list[Run], reference: str) -> str:
    """Per grid and method: the best at each share (mean ± standard error over seeds) and, against ``reference``
    with the same seed (the same table and sampler seed), the mean difference and the seeds won or tied."""
    lines = []
    for grid in dict.fromkeys(run.grid for run in runs):
        on_grid = {(run.method, run.seed): run for run in runs if run.grid == grid}
        seeds = sorted({seed for _, seed in on_grid})
        budget = next(iter(on_grid.values())).budget
        lines.append(f"grid {grid}: best val/bbox_mAP (AP) at 25/50/100 % of {budget} epochs, mean ± s.e. over "
                     f"{len(seeds)} seeds; against {reference}: mean difference (its seeds won+tied)")
        for method in dict.fromkeys(method for method, _ in on_grid):
            cells = []
            for share in SHARES:
                bests = [on_grid[method, s].best_within(share * budget) for s in seeds]
                cell = _mean_se(bests)
                if method != reference:
                    theirs = [on_grid[reference, s].best_within(share * budget) for s in seeds]
                    gaps = [r - m for r, m in zip(theirs, bests, strict=True)]
                    cell += f" ({_mean_se(gaps, signed=True)}, {sum(g >= 0 for g in gaps)}/{len(seeds)})"
                cells.append(cell)
            lines.append(f"  {method:<28}" + "  ".join(f"{c:>30}" for c in cells))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", type=Path, required=True, help="bench/race_table.py's table.json")
    parser.add_argument("--seeds", type=int, default=1000)
    parser.add_argument("--budget", type=int, default=24, help="epochs per run, as bench/race.py's")
    everything = {**METHODS, **VARIANTS}
    parser.add_argument("--methods", nargs="+", choices=list(everything), default=list(METHODS))
    parser.add_argument("--reference", default="dettune", choices=list(everything))
    args = parser.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    tables = read_tables(args.table)
    names = list(dict.fromkeys([args.reference, *args.methods]))
    print(f"replay: {len(tables)} tables ({', '.join(f'{t.grid} seed {t.seed}' for t in tables)}); {args.seeds} "
          f"seeds; budget {args.budget} epochs; load {machine_load()}", flush=True)
    began = time.time()
    runs = race_replay(tables, {name: everything[name] for name in names}, args.seeds, args.budget)
    print(summary(runs, args.reference))
    print(f"{time.time() - began:.0f} s; load {machine_load()}")


if __name__ == "__main__":
    main()
