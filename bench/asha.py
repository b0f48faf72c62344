"""ASHA's bargain: how much of the exhaustive best a search keeps, for what share of the epochs.

A fixed grid of 12 configurations of the demo model on synthetic data (6 epochs; ``--grid heads``: RoI head x lr x
schedule, the grid the demo's ASHA settings were chosen on; ``--grid scales``: scale x lr x batch size, one they
were not) is trained (1) exhaustively, (2) with ASHA at the given settings, and (3) by TPE+ASHA with as many trials as
the grid. For each: the best val/bbox_mAP any trial reached, the epochs trained in total and the wall time,
with their ratios to exhaustive. Then successive halving is replayed on the exhaustive run's per-epoch
histories for other settings and rung signals (a replay, not a run: it shows which settings keep the
winner, cheaply), to choose the defaults that the runs then confirm, and simulated asynchronously on them (two at
a time, each epoch as long as it took) under Ray's rule, dettune's rechecked one and the ASHA paper's promotion.

    .venv/bin/python bench/asha.py [--grid heads|scales] [--asha 1:2 1:3 2:3] [--images 96]
    .venv/bin/python bench/asha.py --demo 24   # the demo space, 24 trials x 3 epochs on 48 images: who passes epoch 1
    .venv/bin/python bench/asha.py --grid scales --histories scales.json  # exhaustive once, then replays only
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from mlflow.tracking import MlflowClient

from cocodata.synth import write_dataset
from search.cli import DEMO_SPACE
from search.driver import SearchOptions, run_search
from search.rung import below_cutoff, rung_score
from tracking_names import TAG_ROLE

EPOCHS = 6
GRIDS = {
    "heads": {"roi_head": {"choice": ["faster", "cascade"]}, "lr": {"grid": [0.005, 0.01, 0.02]},
              "schedule": {"choice": ["step", "cosine"]}},
    "scales": {"scale": {"choice": [[128, 128], [192, 192]]}, "lr": {"grid": [0.005, 0.01, 0.02]},
               "batch_size": {"choice": [2, 4]}},
}
FIXED = {"backbone": "r18", "preset": "tiny", "scale": [160, 160], "optimizer": "sgd", "batch_size": 4}
METRIC = "val/bbox_mAP"
RUNG_SCORE = "rung score"
ELAPSED = "elapsed s"
REPLAY_SIGNALS = ("val/bbox_mAP", "val/bbox_mAP_50", "-train/loss", RUNG_SCORE)
"""Rung signals replayed: the metric itself, its looser IoU-0.5 form, the training loss (lower is better), and
what ASHA compares (search/rung.py: the metric, ties broken by the other two)."""


@dataclass
class Outcome:
    label: str
    best: float
    epochs: int
    wall: float


def _space(data: Path, name: str, grid: dict[str, Any], search: dict[str, Any], scheduler: dict[str, Any],
           trials: int) -> dict[str, Any]:
    fixed = {knob: value for knob, value in FIXED.items() if knob not in grid}
    space = {"name": name, "base": "mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py",
             "data": {"root": str(data), "train": "train.json", "val": "val.json"}, "metric": METRIC,
             "budget": {"epochs": EPOCHS, "trials": trials, "max_concurrent": 2, "cpus_per_worker": 1},
             "search": search, "scheduler": scheduler, "space": grid, "fixed": fixed}
    if search["algorithm"] == "tpe":  # TPE samples; the grid's lr list becomes its range
        space["space"] = {**grid, "lr": {"loguniform": [0.005, 0.02]}}
    return space


def histories(tracking_uri: str, name: str) -> list[dict[str, list[float]]]:
    """Each trial's per-epoch values of every metric its run logs per epoch, epoch 1 first, and the rung score;
    trials in the order they started, and under ELAPSED the seconds from the trial's start to each epoch's result."""
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(name)
    assert experiment is not None, name
    runs = client.search_runs([experiment.experiment_id], f"tags.`{TAG_ROLE}` = 'trial'",
                              order_by=["attributes.start_time ASC"])
    out = []
    for run in runs:
        trial = {}
        for key in sorted(run.data.metrics):
            points = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
            trial[key] = [m.value for m in points]
            if key == METRIC:
                trial[ELAPSED] = [(m.timestamp - run.info.start_time) / 1000 for m in points]
        per_epoch = {key: values for key, values in trial.items() if len(values) == len(trial[METRIC])}
        rows = [dict(zip(per_epoch, values, strict=True)) for values in zip(*per_epoch.values(), strict=True)]
        trial[RUNG_SCORE] = [rung_score(row, metric=METRIC, mode="max") for row in rows]
        out.append(trial)
    return out


def run(data: Path, storage: Path, grid: dict[str, Any], label: str, search: dict[str, Any],
        scheduler: dict[str, Any], trials: int) -> tuple[Outcome, list[dict[str, list[float]]]]:
    name = label.replace(" ", "-").replace(":", "-").replace("+", "-")
    space_file = storage / f"{name}.yaml"
    space_file.write_text(yaml.safe_dump(_space(data, name, grid, search, scheduler, trials)))
    began = time.time()
    outcome = run_search(SearchOptions(space_file=space_file, storage=storage))
    wall = time.time() - began
    trained = histories(outcome.tracking_uri, name)
    best = max(max(trial[METRIC], default=0.0) for trial in trained)
    return Outcome(label, best, sum(len(trial[METRIC]) for trial in trained), wall), trained


def replay(trained: list[dict[str, list[float]]], grace: int, factor: int, signal: str) -> tuple[float, int]:
    """Synchronous successive halving over full histories: at each rung (grace x factor^k epochs) the best
    1/factor of the trials by ``signal`` go on. Returns the best METRIC reached and the epochs trained."""
    key, sign = signal.lstrip("-"), (-1.0 if signal.startswith("-") else 1.0)
    alive = list(range(len(trained)))
    stopped_at = {i: EPOCHS for i in alive}
    rung = grace
    while rung < EPOCHS and len(alive) > 1:
        ranked = sorted(alive, key=lambda i: sign * trained[i][key][rung - 1], reverse=True)
        keep = max(1, len(ranked) // factor)
        for i in ranked[keep:]:
            stopped_at[i] = rung
        alive = ranked[:keep]
        rung *= factor
    best = max(max(trained[i][METRIC][:stopped_at[i]]) for i in stopped_at)
    return best, sum(stopped_at.values())


RULES = ("stop", "recheck", "promote")
"""How an asynchronous ASHA decides at a rung (see :func:`simulate`)."""


def _at(trial: dict[str, list[float]], signal: str, epoch: int) -> float:
    return (-1.0 if signal.startswith("-") else 1.0) * trial[signal.lstrip("-")][epoch - 1]


def simulate(trained: list[dict[str, list[float]]], grace: int, factor: int, signal: str, rule: str,
             workers: int = 2) -> tuple[float, int, float]:
    """Asynchronous ASHA over full histories: ``workers`` trials at a time, started in the order the exhaustive run
    started them, each epoch taking as long as it took there. ``rule`` "stop" is Ray's AsyncHyperBandScheduler (a
    trial reaching a rung goes on unless below the percentile of the values recorded there before it); "recheck"
    the same, and after every later epoch a trial stops once its value at a rung it passed is below that percentile
    of the rung's other values recorded since; "promote" the ASHA paper's promotion (a trial waits at each rung,
    paused, until it is among the best 1/factor of the values recorded there; a free worker resumes the best such
    trial, paying its first epoch's setup again, before it starts a new one; trials left waiting at the end stop).
    Returns the best METRIC reached, the epochs trained and the time to the last result."""
    rungs = [grace * factor ** k for k in range(EPOCHS) if grace * factor ** k < EPOCHS]
    recorded: dict[int, dict[int, float]] = {rung: {} for rung in rungs}
    took = [[t[ELAPSED][0]] + [b - a for a, b in zip(t[ELAPSED], t[ELAPSED][1:], strict=False)] for t in trained]
    setup = [max(0.0, times[0] - times[1]) for times in took]
    waiting = list(range(len(trained)))
    done = dict.fromkeys(waiting, 0)
    paused: set[int] = set()
    running: dict[int, float] = {}
    now = 0.0

    def promotable() -> int | None:
        for rung in reversed(rungs):
            ranked = sorted(recorded[rung], key=recorded[rung].__getitem__, reverse=True)
            chosen = [i for i in ranked[:len(ranked) // factor] if i in paused and done[i] == rung]
            if chosen:
                return chosen[0]
        return None

    def fill() -> None:
        while len(running) < workers:
            resumed = promotable() if rule == "promote" else None
            if resumed is not None:
                paused.discard(resumed)
                running[resumed] = now + setup[resumed] + took[resumed][done[resumed]]
            elif waiting:
                new = waiting.pop(0)
                running[new] = now + took[new][0]
            else:
                return

    fill()
    while running:
        trial = min(running, key=running.__getitem__)
        now = running.pop(trial)
        done[trial] += 1
        epoch = done[trial]
        value = _at(trained[trial], signal, epoch)
        go_on = epoch < EPOCHS
        if go_on and epoch in recorded:
            before = list(recorded[epoch].values())
            recorded[epoch][trial] = value
            if rule == "promote":
                paused.add(trial)
                go_on = False
            else:
                go_on = not below_cutoff(value, before, factor)
        if go_on and rule == "recheck":
            go_on = not any(below_cutoff(recorded[rung][trial], [v for i, v in recorded[rung].items() if i != trial],
                                          factor) for rung in rungs if rung < epoch)
        if go_on:
            running[trial] = now + took[trial][epoch]
        fill()
    best = max(max(trained[i][METRIC][:done[i]]) for i in done)
    return best, sum(done.values()), now


def _row(outcome: Outcome, reference: Outcome) -> str:
    return (f"  {outcome.label:<26} best {outcome.best:.4f} ({(outcome.best - reference.best) * 100:+.1f} AP)  "
            f"epochs {outcome.epochs:3d} ({outcome.epochs / reference.epochs:.2f}x)  "
            f"wall {outcome.wall:6.0f} s ({outcome.wall / reference.wall:.2f}x)")


def demo_case(trials: int) -> None:
    """The demo space (TPE, ASHA grace 1, factor 3) with ``trials`` trials of 3 epochs on 48 images: how many
    trials went past epoch 1, against the third ASHA aims at, and where the rung's best and the search's best were."""
    with tempfile.TemporaryDirectory(prefix="dettune-asha-demo-") as tmp:
        data, storage = Path(tmp) / "data", Path(tmp) / "runs"
        write_dataset(data, images=48, size=160, seed=0)
        began = time.time()
        outcome = run_search(SearchOptions(space_file=DEMO_SPACE, storage=storage, trials=trials, epochs=3,
                                           data_root=data))
        wall = time.time() - began
        trained = histories(outcome.tracking_uri, outcome.name)
    passed = [t for t in trained if len(t[METRIC]) > 1]
    first = sorted(t[METRIC][0] for t in trained)
    best_at_rung = max(trained, key=lambda t: t[RUNG_SCORE][0])
    best = max(trained, key=lambda t: max(t[METRIC]))
    print(f"demo space, {trials} trials x 3 epochs, 48 images, ASHA grace 1 factor 3: {wall:.0f} s, "
          f"{sum(len(t[METRIC]) for t in trained)} epochs")
    print(f"  past epoch 1: {len(passed)} of {len(trained)} (a third: {trials / 3:.0f})")
    print(f"  epoch-1 {METRIC}: {len(set(first))} distinct values of {len(first)}, "
          f"{first[0]:.5f} to {first[-1]:.5f}")
    print(f"  the rung's best (by rung score) went on: {best_at_rung in passed}; the search's best "
          f"{max(best[METRIC]):.4f} {'went on' if best in passed else 'stopped at epoch 1'}")


def print_replay(trained: list[dict[str, list[float]]], reference: float) -> None:
    epochs = sum(len(trial[METRIC]) for trial in trained)
    print(f"replayed on the exhaustive histories (synchronous halving; grace:factor, rung signal), "
          f"best {reference:.4f} in {epochs} epochs:")
    for signal in REPLAY_SIGNALS:
        for grace, factor in [(1, 2), (1, 3), (1, 4), (2, 2), (2, 3), (3, 3)]:
            best, used = replay(trained, grace, factor, signal)
            print(f"  {grace}:{factor} on {signal:<18} best {best:.3f} ({(best - reference) * 100:+.1f} AP)  "
                  f"epochs {used:3d} ({used / epochs:.2f}x)")
    wall = sum(trial[ELAPSED][-1] for trial in trained) / 2  # two at a time
    print("simulated asynchronously (2 at a time, each epoch as long as in the exhaustive run; grace:factor, "
          "rung signal, rule):")
    for signal in REPLAY_SIGNALS:
        for grace, factor in [(1, 2), (1, 3), (1, 4), (2, 3)]:
            for rule in RULES:
                best, used, took = simulate(trained, grace, factor, signal, rule)
                print(f"  {grace}:{factor} on {signal:<18} {rule:<8} best {best:.3f} "
                      f"({(best - reference) * 100:+.1f} AP)  epochs {used:3d} ({used / epochs:.2f}x)  "
                      f"time {took / wall:.2f}x")


def replay_saved(path: Path) -> None:
    """The replay alone, on histories a former exhaustive run saved (``--histories``): no training."""
    trained = json.loads(path.read_text())
    print_replay(trained, max(max(trial[METRIC]) for trial in trained))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--asha", nargs="+", default=["1:2", "1:3", "2:3"], help="grace:reduction_factor runs")
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--grid", choices=sorted(GRIDS), default="heads", help="the 12 configurations")
    parser.add_argument("--demo", type=int, metavar="TRIALS", help="run the demo-space case instead of a grid")
    parser.add_argument("--asha-only", action="store_true",
                        help="the ASHA runs alone (no exhaustive run, TPE or replay): epochs against the grid's 12 x 6")
    parser.add_argument("--histories", type=Path, metavar="JSON",
                        help="replay on the exhaustive histories saved here; when the file does not exist yet, run "
                             "the exhaustive grid alone, save its histories there and replay")
    args = parser.parse_args(argv)
    if args.demo:
        demo_case(args.demo)
        return
    if args.histories and args.histories.exists():
        replay_saved(args.histories)
        return
    space = GRIDS[args.grid]
    settings = [tuple(int(part) for part in setting.split(":")) for setting in args.asha]
    grid = {"algorithm": "grid", "seed": 0}
    with tempfile.TemporaryDirectory(prefix="dettune-asha-") as tmp:
        data, storage = Path(tmp) / "data", Path(tmp) / "runs"
        write_dataset(data, images=args.images, size=160, seed=0)
        storage.mkdir()
        if args.histories:
            exhaustive, trained = run(data, storage, space, "exhaustive", grid, {"type": "none"}, 1)
            args.histories.write_text(json.dumps(trained))
            print(_row(exhaustive, exhaustive))
            print_replay(trained, exhaustive.best)
            return
        asha = [run(data, storage, space, f"ASHA {g}:{f}", grid,
                    {"type": "asha", "grace_epochs": g, "reduction_factor": f}, 1)[0] for g, f in settings]
        if args.asha_only:  # the exhaustive run does not depend on ASHA: its 72 epochs are known
            full = Outcome("exhaustive (not run)", math.nan, 12 * EPOCHS, math.nan)
            print("\n".join(_row(outcome, full) for outcome in asha))
            return
        exhaustive, trained = run(data, storage, space, "exhaustive", grid, {"type": "none"}, 1)
        g, f = settings[-1]
        outcomes = asha + [run(data, storage, space, f"TPE+ASHA {g}:{f}", {"algorithm": "tpe", "seed": 0},
                            {"type": "asha", "grace_epochs": g, "reduction_factor": f}, len(trained))[0]]
    print(f"grid {args.grid} ({' x '.join(space)}): 12 configurations x {EPOCHS} epochs, tiny R-CNN, "
          f"{args.images} synthetic images, 2 trials at once")
    print(_row(exhaustive, exhaustive))
    for outcome in outcomes:
        print(_row(outcome, exhaustive))
    print_replay(trained, exhaustive.best)


if __name__ == "__main__":
    main()
