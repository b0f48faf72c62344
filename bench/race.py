"""The anytime race: for the same compute, which search finds the better detector, and how soon.

Seven searches over the same space (a grid of bench/asha.py as ranges: lr log-uniform over the grid's span, the
other knobs categorical, the rest fixed as there), the same trainer (dettune's mmdet trial, tiny preset, on
synthetic data), the same epochs per trial, 2 trials at a time and the same seeds, each stopped once it has
consumed the same budget of B epochs (every epoch a trial reports counts; what runs then is stopped, and no
later report counts). Each run's anytime curve is the best val/bbox_mAP so far against the epochs consumed and
the wall seconds; printed per grid and method: the best at 25/50/100 % of B (mean ± standard deviation over the
seeds) and the epochs to come within 0.5 AP of the best any method found with that seed.

The methods (:data:`METHODS`; each function's docstring says what it stands for): dettune's default, Ray Tune's
default (random + ``ASHAScheduler()``), Optuna alone (TPE + ``HyperbandPruner``, TPE + ``MedianPruner``), the
exhaustive grid as ``mim gridsearch`` runs it, PASHA and top-K after one epoch. None is left out.

    .venv/bin/python -m bench.race --quick --out race-quick   # 1 seed, grid heads, B 12: a first look
    .venv/bin/python -m bench.race --out race                  # both grids, 3 seeds, 7 methods
    .venv/bin/python -m bench.race --out race --summarise      # the table and PNG again from race/race.json

(``-m`` from the repository root: the bench imports bench.asha.) The JSON of every run's curve and one PNG of the
mean curves go to ``--out``.
"""

from __future__ import annotations

import argparse
import fcntl
import itertools
import json
import math
import multiprocessing
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import optuna
from optuna.storages.journal import JournalFileBackend
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import BasicVariantGenerator
from ray.tune.stopper import CombinedStopper, MaximumIterationStopper, Stopper

from bench.asha import FIXED, GRIDS, METRIC
from cocodata.dataset import open_dataset
from cocodata.synth import write_dataset
from search.driver import (
    connect_ray,
    make_plan,
    make_scheduler,
    make_searcher,
    quiet_tune_console,
    trial_resources,
)
from search.rung import RUNG_SCORE, below_cutoff, rung_score
from search.trainable import tune_trial
from spaces.schema import Space
from trainers.metrics import EPOCH
from trainers.trial import TrialSpec, run_trial

if TYPE_CHECKING:
    from ray.tune.execution.tune_controller import TuneController
    from ray.tune.experiment import Trial

BASE = "mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py"
CONCURRENCY = 2
WITHIN = 0.005
"""0.5 AP in mAP units: "as good as the best" for the epochs-to-best column."""
SHARES = (0.25, 0.5, 1.0)
EPOCH_S = 7.5
"""Seconds one trial's epoch takes on 48 images at 160 px, tiny preset, 2 trials at once on the 2-core machine
(trial starts after the first included): the --quick race of 7 x 12 epochs took 51-88 s a run at load 4-6."""
RUN_START_S = 25.0
"""A run's seconds to its first epoch: Ray's trial processes or the two Optuna processes importing mmdet, Tune."""


@dataclass(frozen=True)
class Size:
    """What one run trains: epochs per trial and the budget in epochs."""

    images: int = 48
    epochs: int = 4
    budget: int = 24
    grids: tuple[str, ...] = ("heads", "scales")
    seeds: tuple[int, ...] = (0, 1, 2)


QUICK = Size(epochs=4, budget=12, grids=("heads",), seeds=(0,))


@dataclass(frozen=True)
class Race:
    """One run's setting: the data, its own folder, the grid, the seed and the budget."""

    data: Path
    work: Path
    grid: str
    seed: int
    epochs: int
    budget: int


@dataclass(frozen=True)
class Event:
    """One counted epoch: which trial, its epoch, its val/bbox_mAP, seconds since the run began; ``score`` is
    what a scheduler ranks (the mAP with its ties broken, search/rung.py)."""

    trial: str
    epoch: int
    value: float
    seconds: float
    score: float


def grid_of(race: Race) -> dict[str, dict[str, list[Any]]]:
    """The race's grid of bench/asha.py: knob -> {"grid" or "choice": values}."""
    return cast(dict[str, dict[str, list[Any]]], GRIDS[race.grid])


def space_of(race: Race, name: str, algorithm: str, grid: dict[str, dict[str, list[Any]]] | None = None) -> Space:
    """The grid's knobs (``grid``, by default the race's) as a search space (lr log-uniform over the grid's span) or,
    for ``grid``, as the grid."""
    grid = grid or grid_of(race)
    knobs = grid if algorithm == "grid" else {
        knob: {"loguniform": [min(d["grid"]), max(d["grid"])]} if "grid" in d else d for knob, d in grid.items()}
    return Space.from_json({
        "name": name, "base": BASE, "metric": METRIC,
        "data": {"root": str(race.data), "train": "train.json", "val": "val.json"},
        "budget": {"epochs": race.epochs, "trials": race.budget + CONCURRENCY, "max_concurrent": CONCURRENCY,
                   "cpus_per_worker": 1},
        # The asha section makes every trial report the rung score too (what dettune's ASHA, PASHA and top-K rank).
        "search": {"algorithm": algorithm, "seed": race.seed}, "scheduler": {"type": "asha"},
        "space": knobs, "fixed": {knob: value for knob, value in FIXED.items() if knob not in grid},
    }, "race")


def read_events(log: Path) -> list[Event]:
    """The counted epochs, in the order they were counted."""
    if not log.is_file():
        return []
    return [Event(**json.loads(line)) for line in log.read_text().splitlines() if line]


def _line(event: Event) -> str:
    """An event as its line of the run's log (:func:`read_events` reads them back)."""
    return json.dumps(asdict(event)) + "\n"


def _append(log: Path, event: Event) -> None:
    with log.open("a") as file:
        file.write(_line(event))


class EpochBudget(Stopper):
    """Counts every epoch a Tune trial reports into ``log`` until ``budget`` are counted, then stops the run.

    Each epoch once: when a trial's function returns, Tune hands its last result to the stopper again.
    """

    def __init__(self, log: Path, budget: int, began: float, *, spent: int = 0) -> None:
        self._log, self._budget, self._began, self._spent = log, budget, began, spent
        self._counted: set[tuple[str, int]] = set()

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        if METRIC in result and self._spent < self._budget and (trial_id, result[EPOCH]) not in self._counted:
            self._counted.add((trial_id, result[EPOCH]))
            self._spent += 1
            _append(self._log, Event(trial_id, int(result[EPOCH]), float(result[METRIC]),
                                     time.time() - self._began, float(result.get(RUNG_SCORE, result[METRIC]))))
        return False

    def stop_all(self) -> bool:
        return self._spent >= self._budget


class PASHA(FIFOScheduler):
    """Progressive ASHA (Bohdal, Balles, Wistuba, Ermis, Archambeau, Zappella, "PASHA: Efficient HPO and NAS
    with Progressive Resource Allocation", ICLR 2023): ASHA whose maximum rung starts at the second rung and
    grows by the reduction factor only while the ranking of the trials in the top two rungs disagrees.

    Asynchronous successive halving of the stopping kind (Ray's rule at a trial's arrival at a rung), not the
    paper's promotion kind: a trial that reached the then-maximum rung stops and is not resumed when the maximum
    grows; later trials go further. Two trials disagree when their order in the two rungs differs by more than
    ``epsilon`` on both (the paper's soft ranking with a fixed epsilon; 0: strict ranking).
    """

    def __init__(self, *, time_attr: str, metric: str, mode: str, max_t: int, grace_period: int = 1,
                 reduction_factor: int = 3, epsilon: float = 0.0) -> None:
        super().__init__()
        self._time_attr, self._metric, self._sign = time_attr, metric, (1.0 if mode == "max" else -1.0)
        self._factor, self._epsilon = reduction_factor, epsilon
        levels = list(itertools.takewhile(lambda t: t < max_t, (grace_period * reduction_factor ** k
                                                                for k in itertools.count())))
        self._levels = [*levels, max_t]
        self._rungs: dict[int, dict[str, float]] = {level: {} for level in self._levels}
        self._top = min(1, len(self._levels) - 1)  # the index of the current maximum rung

    @property
    def max_rung(self) -> int:
        return self._levels[self._top]

    def on_trial_result(self, tune_controller: TuneController, trial: Trial, result: dict[str, Any]) -> str:
        if self._time_attr not in result or self._metric not in result:
            return self.CONTINUE
        t = int(result[self._time_attr])
        if t not in self._rungs:
            return self.CONTINUE
        rung = self._rungs[t]
        score = self._sign * result[self._metric]
        below = below_cutoff(score, list(rung.values()), self._factor)
        rung[trial.trial_id] = score
        if t >= self.max_rung:
            if self._top == len(self._levels) - 1 or not self._ranking_unstable():
                return self.STOP
            self._top += 1
        return self.STOP if below else self.CONTINUE

    def _ranking_unstable(self) -> bool:
        top, below = self._rungs[self._levels[self._top]], self._rungs[self._levels[self._top - 1]]
        both = [trial for trial in top if trial in below]
        return any((below[a] - below[b]) * (top[a] - top[b]) < 0 and abs(below[a] - below[b]) > self._epsilon
                   and abs(top[a] - top[b]) > self._epsilon for a, b in itertools.combinations(both, 2))


def tune_run(race: Race, space: Space, *, search_alg: Any, scheduler: TrialScheduler, samples: int,
              param_space: dict[str, Any], log: Path, began: float, metric: str | None = None, spent: int = 0,
              stop: Stopper | None = None) -> tune.ResultGrid:
    """Trains ``space``'s trials with dettune's Tune trial function, under the epoch budget."""
    plan = make_plan(space, race.work)
    budget: Stopper = EpochBudget(log, race.budget, began, spent=spent)
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(tune_trial, plan=plan), trial_resources(plan)),
        param_space=param_space,
        tune_config=tune.TuneConfig(search_alg=search_alg, scheduler=scheduler, num_samples=samples,
                                    metric=metric, mode="max" if metric else None, reuse_actors=True),
        run_config=tune.RunConfig(name=space.name, storage_path=str(race.work), verbose=0,
                                  stop=CombinedStopper(budget, stop) if stop else budget))
    return tuner.fit()


def dettune_default(race: Race, log: Path, began: float) -> None:
    """dettune's default: TPE (Optuna's sampler through dettune's Tune searcher) and RecheckedASHA (grace 1,
    factor 3, rung score): the searcher and scheduler run_search builds for a space that names neither, and its
    trial function, in a Tuner of the race's own (run_search takes no stopper: the budget in epochs needs one;
    nothing else of it changes what is trained: no MLflow, no time budget)."""
    space = space_of(race, "dettune", "tpe")
    searcher, param_space, samples = make_searcher(space)
    tune_run(race, space, search_alg=searcher, scheduler=make_scheduler(space), samples=samples,
              param_space=param_space, log=log, began=began)


def tune_default(race: Race, log: Path, began: float) -> None:
    """Ray Tune's default: its variant generator's random sampling and ``ASHAScheduler()`` as constructed with no
    argument (grace 1, factor 4, on training_iteration, the epoch here) on val/bbox_mAP, through a Tuner."""
    space = space_of(race, "tune", "random")
    tune_run(race, space, search_alg=BasicVariantGenerator(random_state=race.seed, max_concurrent=CONCURRENCY),
              scheduler=ASHAScheduler(), samples=space.budget.trials, param_space=space.tune_param_space(),
              log=log, began=began, metric=METRIC)


def exhaustive_grid(race: Race, log: Path, began: float) -> None:
    """An exhaustive grid as ``search.algorithm: grid`` (and ``mim gridsearch``) runs it: every combination for every
    epoch, 2 at a time, no early stopping, in Tune's order of the grid (``grid_search`` per knob); cut where the
    budget ends. (Handing Tune the combinations as ``points_to_evaluate``, in itertools.product's order, fails on a
    knob whose values are lists: ``scale``.)"""
    space = space_of(race, "grid", "grid")
    tune_run(race, space, search_alg=BasicVariantGenerator(max_concurrent=CONCURRENCY), scheduler=FIFOScheduler(),
              samples=1, param_space=space.tune_param_space(), log=log, began=began)


def pasha(race: Race, log: Path, began: float) -> None:
    """PASHA (Bohdal et al., ICLR 2023) at the paper's grace 1 and factor 3 over random sampling, ranking the rung
    score; see :class:`PASHA` for how it departs from the paper."""
    space = space_of(race, "pasha", "random")
    scheduler = PASHA(time_attr=EPOCH, metric=RUNG_SCORE, mode="max", max_t=race.epochs)
    tune_run(race, space, search_alg=BasicVariantGenerator(random_state=race.seed, max_concurrent=CONCURRENCY),
              scheduler=scheduler, samples=space.budget.trials, param_space=space.tune_param_space(), log=log,
              began=began)


def top_k_split(race: Race) -> tuple[int, int]:
    """(N, K): about half the budget to one epoch of each of N random configurations, the rest to training the K
    best for every epoch."""
    k = max(1, race.budget // (2 * race.epochs))
    return max(1, race.budget - k * race.epochs), k


def top_k_after_one_epoch(race: Race, log: Path, began: float) -> None:
    """"Top-K after one epoch" (Egele, Guyon, Wang, Balaprakash, "Is One Epoch All You Need For Multi-Fidelity
    Hyperparameter Optimization?", arXiv 2307.15422): N random configurations one epoch each, then the K best by
    that epoch's rung score trained for every epoch, from scratch (their first epoch counts again)."""
    n, k = top_k_split(race)
    space = space_of(race, "top-k-1", "random")
    first = tune_run(race, space, search_alg=BasicVariantGenerator(random_state=race.seed,
                                                                     max_concurrent=CONCURRENCY),
                      scheduler=FIFOScheduler(), samples=n, param_space=space.tune_param_space(), log=log,
                      began=began, stop=MaximumIterationStopper(1))
    scores = {event.trial: event.score for event in read_events(log)}
    results = [first[i] for i in range(len(first))]
    configs = {result.metrics["trial_id"]: result.config or {} for result in results if result.metrics}
    best = sorted((trial for trial in configs if trial in scores), key=scores.__getitem__, reverse=True)[:k]
    spent = len(read_events(log))
    if not best or spent >= race.budget:
        return
    # The K configurations go to Tune as points in Optuna's encoding (a list-valued choice such as scale as text:
    # Tune's check of preset points fails on list values), which the trials of a "tpe" space decode.
    space = space_of(race, "top-k-2", "tpe")
    points = [space.encode_optuna(configs[t]) for t in best]
    choices = {knob: tune.choice(list(dict.fromkeys(point[knob] for point in points))) for knob in points[0]}
    tune_run(race, space, search_alg=BasicVariantGenerator(points_to_evaluate=points, max_concurrent=CONCURRENCY),
              scheduler=FIFOScheduler(), samples=len(best), param_space=choices, log=log, began=began, spent=spent)


@dataclass(frozen=True)
class OptunaJob:
    """What each Optuna process needs: the race, the study's journal file and its pruner's name."""

    race: Race
    journal: Path
    pruner: str
    log: Path
    spent_flag: Path
    began: float


def journal_storage(journal: Path) -> optuna.storages.JournalStorage:
    return optuna.storages.JournalStorage(JournalFileBackend(str(journal)))


PRUNERS: dict[str, Callable[[], optuna.pruners.BasePruner]] = {
    "hyperband": optuna.pruners.HyperbandPruner, "median": optuna.pruners.MedianPruner}


def optuna_worker(job: OptunaJob, worker: int) -> None:
    """One of the two processes of an Optuna user's search: ``study.optimize`` on the shared journal study, its
    objective training with the mmengine Runner of dettune's trial, reporting and pruning after every epoch."""
    import torch

    torch.set_num_threads(1)  # one core each, as Ray gives each trial
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not a line per trial into the race's output
    race = job.race
    space = space_of(race, f"optuna-{job.pruner}", "tpe")
    dataset = open_dataset(race.data, "train.json", "val.json")
    study = optuna.load_study(study_name=space.name, storage=journal_storage(job.journal),
                              sampler=optuna.samplers.TPESampler(seed=race.seed * 1000 + worker),
                              pruner=PRUNERS[job.pruner]())

    def objective(trial: optuna.Trial) -> float:
        params = {name: (trial.suggest_float(name, dist.low, dist.high, log=dist.log)
                         if isinstance(dist, optuna.distributions.FloatDistribution)
                         else trial.suggest_categorical(name, dist.choices))
                  for name, dist in space.optuna_space().items()}
        spec = TrialSpec(base=BASE, dataset=dataset, point=space.point(params), seed=race.seed,
                         work_dir=race.work / space.name / f"trial{trial.number}")

        def report(row: dict[str, float], checkpoint: Path) -> None:
            if not _count_optuna_epoch(job, trial, row):
                study.stop()
                raise optuna.TrialPruned("the race's epoch budget is spent")
            if trial.should_prune():
                raise optuna.TrialPruned()

        rows = run_trial(spec, report=report)
        return rows[-1][METRIC]

    # As a user keeps a study going past a trial that diverged or ran out of memory (both RuntimeErrors).
    study.optimize(objective, n_trials=race.budget, catch=(RuntimeError,))


def _count_optuna_epoch(job: OptunaJob, trial: optuna.Trial, row: dict[str, float]) -> bool:
    """Reports the epoch to Optuna and counts it, under a lock shared by both processes; False once the budget
    is spent (then nothing is reported). The process counting the last epoch marks the budget spent."""
    with job.log.open("a+") as file:
        fcntl.flock(file, fcntl.LOCK_EX)
        file.seek(0)
        spent = sum(1 for _ in file)
        if spent >= job.race.budget:
            return False
        epoch = int(row[EPOCH])
        trial.report(row[METRIC], epoch)
        score = rung_score(row, metric=METRIC, mode="max")
        file.write(_line(Event(f"optuna-{trial.number}", epoch, row[METRIC], time.time() - job.began, score)))
        file.flush()
        if spent + 1 >= job.race.budget:
            job.spent_flag.touch()
    return True


def optuna_alone(race: Race, log: Path, began: float, pruner: str) -> None:
    """Two processes on one study in a JournalStorage file (mmengine's Runner, logger and stdout redirection
    are per process, so ``n_jobs=2`` threads would share them); once the budget is spent the other process is
    stopped where it is."""
    journal = race.work / f"optuna-{pruner}.journal"
    optuna.create_study(study_name=f"optuna-{pruner}", storage=journal_storage(journal), direction="maximize")
    job = OptunaJob(race=race, journal=journal, pruner=pruner, log=log, spent_flag=race.work / f"{pruner}.spent",
                    began=began)
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=optuna_worker, args=(job, worker)) for worker in range(CONCURRENCY)]
    for process in workers:
        process.start()
    while any(process.is_alive() for process in workers) and not job.spent_flag.exists():
        time.sleep(0.2)
    for process in workers:
        if process.is_alive():
            process.terminate()
        process.join()


def optuna_hyperband(race: Race, log: Path, began: float) -> None:
    """Optuna alone: ``TPESampler()`` (seeded) and ``HyperbandPruner()`` at their defaults, per-epoch reports."""
    optuna_alone(race, log, began, "hyperband")


def optuna_median(race: Race, log: Path, began: float) -> None:
    """Optuna alone: ``TPESampler()`` (seeded) and ``MedianPruner()`` at their defaults, per-epoch reports."""
    optuna_alone(race, log, began, "median")


Method = Callable[[Race, Path, float], None]
METHODS: dict[str, Method] = {
    "dettune": dettune_default, "tune-random-asha": tune_default, "optuna-tpe-hyperband": optuna_hyperband,
    "optuna-tpe-median": optuna_median, "grid": exhaustive_grid, "pasha": pasha,
    "top-k-1-epoch": top_k_after_one_epoch}


@dataclass(frozen=True)
class Run:
    """One method's run on one grid and seed: its counted epochs, in order, and its wall seconds."""

    method: str
    grid: str
    seed: int
    budget: int
    events: list[Event]
    wall: float

    def curve(self) -> list[tuple[int, float, float]]:
        """(epochs consumed, seconds, best val/bbox_mAP so far) after each counted epoch."""
        best, points = -math.inf, []
        for consumed, event in enumerate(self.events, 1):
            best = max(best, event.value)
            points.append((consumed, event.seconds, best))
        return points

    def best_within(self, epochs: float) -> float:
        """The best found within the first ``epochs`` epochs (NaN before the first)."""
        bests = [best for consumed, _, best in self.curve() if consumed <= epochs]
        return bests[-1] if bests else math.nan

    def epochs_to(self, target: float) -> int | None:
        return next((consumed for consumed, _, best in self.curve() if best >= target), None)


def run_method(method: str, race: Race) -> Run:
    """Runs ``method`` in its own folder under ``race.work``."""
    race = Race(race.data, race.work / method, race.grid, race.seed, race.epochs, race.budget)
    race.work.mkdir(parents=True)
    log = race.work / "events.jsonl"
    began = time.time()
    METHODS[method](race, log, began)
    return Run(method, race.grid, race.seed, race.budget, read_events(log), time.time() - began)


def estimate_s(size: Size, methods: int) -> float:
    runs = len(size.grids) * len(size.seeds) * methods
    return runs * (size.budget * EPOCH_S / CONCURRENCY + RUN_START_S)


def _mean_sd(values: list[float]) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "-"
    spread = statistics.pstdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values) * 100:5.2f} ± {spread * 100:4.2f}"


def summary(runs: list[Run]) -> str:
    """Per grid and method: the best (AP, mean ± sd over seeds) at each share of the budget, and the epochs to
    come within 0.5 AP of the best any method found with the same seed (mean over the seeds that did)."""
    lines = []
    for grid in dict.fromkeys(run.grid for run in runs):
        on_grid = [run for run in runs if run.grid == grid]
        budget = on_grid[0].budget
        target = {seed: max(run.best_within(budget) for run in on_grid if run.seed == seed)
                  for seed in {run.seed for run in on_grid}}
        lines.append(f"grid {grid}: best val/bbox_mAP (AP) at 25/50/100 % of {budget} epochs, epochs to within 0.5 AP"
                     f" of the best found ({', '.join(f'seed {s}: {t * 100:.2f}' for s, t in sorted(target.items()))})")
        for method in dict.fromkeys(run.method for run in on_grid):
            mine = [run for run in on_grid if run.method == method]
            cells = [_mean_sd([run.best_within(share * budget) for run in mine]) for share in SHARES]
            reached = [e for run in mine if (e := run.epochs_to(target[run.seed] - WITHIN)) is not None]
            to_best = f"{statistics.mean(reached):4.1f}" if reached else "   -"
            to_best += f" ({len(reached)}/{len(mine)})"
            wall = statistics.mean(run.wall for run in mine)
            lines.append(f"  {method:<22} {'  '.join(f'{c:>13}' for c in cells)}   to best {to_best:<11}"
                         f" wall {wall:5.0f} s")
    return "\n".join(lines)


def plot(runs: list[Run], path: Path) -> None:
    """One PNG: per grid, the mean (over seeds) best-so-far against epochs consumed and against wall seconds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grids = list(dict.fromkeys(run.grid for run in runs))
    figure, axes = plt.subplots(len(grids), 2, figsize=(12, 4.5 * len(grids)), squeeze=False)
    for row, grid in zip(axes, grids, strict=True):
        for method in dict.fromkeys(run.method for run in runs):
            mine = [run for run in runs if run.grid == grid and run.method == method]
            if not mine:  # a partial race (--grids, --methods)
                continue
            budget = mine[0].budget
            by_epoch = [statistics.mean(run.best_within(e) for run in mine) for e in range(1, budget + 1)]
            row[0].plot(range(1, budget + 1), [v * 100 for v in by_epoch], label=method)
            seconds = sorted({s for run in mine for _, s, _ in run.curve()})
            row[1].plot(seconds, [100 * statistics.mean(_best_at_second(run, s) for run in mine) for s in seconds],
                        label=method)
        row[0].set(title=f"{grid}: best so far against epochs", xlabel="epochs consumed", ylabel="val/bbox_mAP (AP)")
        row[1].set(title=f"{grid}: best so far against wall time", xlabel="seconds", ylabel="val/bbox_mAP (AP)")
        row[0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def _best_at_second(run: Run, second: float) -> float:
    bests = [best for _, s, best in run.curve() if s <= second]
    return bests[-1] if bests else 0.0


def machine_load() -> str:
    """The 1, 5 and 15-minute load averages, as the other benches print the machine's load."""
    return ", ".join(f"{load:.2f}" for load in os.getloadavg())


def race_all(size: Size, methods: Sequence[str], out: Path) -> list[Run]:
    """Every method on every grid and seed; the results JSON is rewritten after each run."""
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="dettune-race-") as tmp:
        data = Path(tmp) / "data"
        write_dataset(data, images=size.images, size=160, seed=0)
        for grid, seed, method in itertools.product(size.grids, size.seeds, methods):
            race = Race(data, Path(tmp) / grid / f"seed{seed}", grid, seed, size.epochs, size.budget)
            run = run_method(method, race)
            runs.append(run)
            print(f"{grid} seed {seed} {method}: {len(run.events)} epochs, best "
                  f"{run.best_within(size.budget) * 100:.2f} AP, {run.wall:.0f} s", flush=True)
            (out / "race.json").write_text(json.dumps({"size": asdict(size), "runs": [asdict(r) for r in runs]}))
            shutil.rmtree(race.work / method)  # its checkpoints: gigabytes over the whole race
    return runs


def saved_runs(results: Path) -> list[Run]:
    """The runs of a race.json, as race_all wrote them (it rewrites the file after each run)."""
    saved = json.loads(results.read_text())["runs"]
    return [Run(**{**run, "events": [Event(**event) for event in run["events"]]}) for run in saved]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for race.json and race.png")
    parser.add_argument("--summarise", action="store_true",
                        help="print the table and draw the PNG of the runs already in --out's race.json, train nothing")
    parser.add_argument("--quick", action="store_true", help=f"1 seed, grid heads, B {QUICK.budget}")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--budget", type=int, help="epochs per run (default 24, --quick 12)")
    parser.add_argument("--epochs", type=int, help="epochs per trial (default 4)")
    parser.add_argument("--grids", nargs="+", choices=list(GRIDS), help="default: both (--quick: heads)")
    parser.add_argument("--seeds", nargs="+", type=int, help="default: 0 1 2 (--quick: 0)")
    args = parser.parse_args(argv)
    if args.summarise:
        runs = saved_runs(args.out / "race.json")
        print(summary(runs))
        plot(runs, args.out / "race.png")
        return
    size = QUICK if args.quick else Size()
    size = Size(size.images, args.epochs or size.epochs, args.budget or size.budget,
                tuple(args.grids or size.grids), tuple(args.seeds or size.seeds))
    if size.budget < 1 or size.epochs < 2:
        parser.error("--budget must be at least 1 and --epochs at least 2 (ASHA's first rung is epoch 1)")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} is a file: name a folder for race.json and race.png")
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"race: grids {', '.join(size.grids)}; seeds {size.seeds}; {len(args.methods)} methods; {size.epochs} "
          f"epochs a trial, budget {size.budget} epochs a run; {size.images} images at 160 px; estimated "
          f"{estimate_s(size, len(args.methods)) / 60:.0f} min (at load 4-6 on 2 cores)", flush=True)
    print(f"load at start: {machine_load()} ({time.strftime('%H:%M:%S')})", flush=True)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's legacy output at verbose 0: nothing per run
    connect_ray(None)
    quiet_tune_console()
    runs = race_all(size, args.methods, args.out)
    print(summary(runs))
    plot(runs, args.out / "race.png")
    print(f"load at end: {machine_load()} ({time.strftime('%H:%M:%S')})")
    print(f"wrote {args.out / 'race.json'} and {args.out / 'race.png'}")


if __name__ == "__main__":
    main()
