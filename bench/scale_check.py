"""bench/scale.py's reading of a finished search: MLflow checked against the stand-in's record, and the figures.

MLflow's store is read with SQL, straight from its PostgreSQL (one query for every point of every run, where the
client would need one request per run and metric); the tables are MLflow's own (runs, tags, metrics).
"""

from __future__ import annotations

import json
import resource
import statistics
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

PRIMARY = "val/bbox_mAP"
ENDED = {"completed", "stopped", "failed"}


@dataclass
class TrialRecord:
    """What one stand-in trial did: its starts and ends (one per process that ran it), and each epoch's row
    with every time it reported it (a retried trial reports the epochs after its checkpoint again)."""

    starts: list[float]
    ends: list[float]
    epochs: dict[int, list[tuple[float, dict[str, float]]]]


def read_record(record: Path) -> dict[str, TrialRecord]:
    trials = {}
    for log in record.glob("*.jsonl"):
        trial = TrialRecord([], [], defaultdict(list))
        for line in log.read_text().splitlines():
            entry = json.loads(line)
            if entry["event"] == "start":
                trial.starts.append(entry["time"])
            elif entry["event"] == "end":
                trial.ends.append(entry["time"])
            else:
                trial.epochs[entry["epoch"]].append((entry["time"], entry["row"]))
        trials[log.stem] = trial
    return trials


@dataclass(frozen=True)
class Store:
    """One search's runs and points as MLflow's tables hold them."""

    trial_runs: list[tuple[str, str, str | None, str]]  # (run id, trial id, dettune.status, run status)
    parent_metrics: dict[str, float]
    points: dict[str, list[tuple[str, int, float, int]]]  # run id -> (key, step, value, timestamp ms)


def read_store(dsn: str, search: str) -> Store:
    with psycopg.connect(dsn) as db:
        runs = db.execute("""
            SELECT r.run_uuid, role.value, trial.value, status.value, r.status FROM runs r
            JOIN experiments e ON e.experiment_id = r.experiment_id
            JOIN tags role ON role.run_uuid = r.run_uuid AND role.key = 'dettune.role'
            LEFT JOIN tags trial ON trial.run_uuid = r.run_uuid AND trial.key = 'dettune.trial_id'
            LEFT JOIN tags status ON status.run_uuid = r.run_uuid AND status.key = 'dettune.status'
            WHERE e.name = %s AND r.lifecycle_stage = 'active'""", (search,)).fetchall()
        ids = [run[0] for run in runs]
        points: dict[str, list[tuple[str, int, float, int]]] = defaultdict(list)
        for run_id, key, step, value, stamp in db.execute(
                "SELECT run_uuid, key, step, value, timestamp FROM metrics WHERE run_uuid = ANY(%s)", (ids,)):
            points[run_id].append((key, int(step), float(value), int(stamp)))
    (parent,) = [run[0] for run in runs if run[1] == "parent"]
    parent_metrics = {key: value for key, _, value, _ in points.pop(parent, [])}
    return Store([(run[0], run[2], run[3], run[4]) for run in runs if run[1] == "trial"], parent_metrics, points)


def dsn_of(pg: Any) -> str:
    return f"host=127.0.0.1 port={pg.port} user={pg.user} password={pg.password} dbname={pg.database}"


def check_exactly_once(pg: Any, search: str, record: Path) -> list[str]:
    """What MLflow holds that the stand-in's record contradicts: a point missing, doubled or of another value,
    a trial with no run or several, a run still open, the parent's best not the best of the points."""
    return problems_of(read_store(dsn_of(pg), search), read_record(record))


def problems_of(store: Store, trials: dict[str, TrialRecord]) -> list[str]:
    problems = []
    runs_of = Counter(trial for _, trial, _, _ in store.trial_runs)
    problems += [f"trial {trial}: {count} runs" for trial, count in runs_of.items() if count > 1]
    # A trial that never reported may have no run: a driver killed as it started the trial, before Tune's snapshot
    # and the trial's run were written, leaves nothing of it (its points: none) and the resumed search goes on.
    problems += [f"trial {trial}: reported, but has no run" for trial, record in trials.items()
                 if trial not in runs_of and record.epochs]
    best = None
    for run_id, trial, status, run_status in store.trial_runs:
        if status not in ENDED or run_status == "RUNNING":
            problems.append(f"trial {trial}: still pending ({status}, {run_status})")
        recorded = trials.get(trial, TrialRecord([], [], {}))
        counts = Counter((key, step) for key, step, _, _ in store.points.get(run_id, []))
        values = {(key, step): value for key, step, value, _ in store.points.get(run_id, [])}
        problems += [f"trial {trial}: {key} at epoch {step} written {n} times" for (key, step), n in counts.items()
                     if n > 1]
        problems += [f"trial {trial}: {key} at epoch {step} was never reported" for key, step in counts
                     if step not in recorded.epochs]
        for epoch, reports in recorded.epochs.items():
            row = reports[0][1]
            if any(other != row for _, other in reports):
                problems.append(f"trial {trial}: epoch {epoch} reported with different values")
            for key, value in row.items():
                if key == "epoch":
                    continue
                if (key, epoch) not in values:
                    problems.append(f"trial {trial}: {key} at epoch {epoch} missing")
                elif values[key, epoch] != value:
                    problems.append(f"trial {trial}: {key} at epoch {epoch} is {values[key, epoch]}, not {value}")
            if status != "failed" and PRIMARY in row:
                best = max(best if best is not None else row[PRIMARY], row[PRIMARY])
    if store.parent_metrics.get(PRIMARY) != best:
        problems.append(f"the parent's best {PRIMARY} is {store.parent_metrics.get(PRIMARY)}, the points' {best}")
    return problems


# --- figures --------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Figures:
    trials: int
    wall_s: float
    trials_phase_s: float
    """From the first trial's start to the last one's end: the wall time less the driver's start (its check of
    the space, the trial processes' imports) and end."""
    reports: int
    allocated_share: float
    allocated_share_whole: float
    driver_cpu_ms_per_result: float
    driver_cpu_ms_per_result_all: float
    delay_p50_s: float
    delay_p99_s: float
    suggest_ms: dict[str, float]
    snapshots: int
    snapshot_median_s: float
    snapshot_max_s: float
    snapshot_total_s: float
    driver_peak_mb: float
    fit_cpu_by_thread_s: dict[str, float]
    """The driver's CPU in Tune's fit by thread (the last driver's, when one was killed and resumed)."""

    @property
    def trials_per_hour(self) -> float:
        return self.trials / self.wall_s * 3600

    def text(self) -> str:
        suggest = ", ".join(f"{k}: {v:.1f}" for k, v in self.suggest_ms.items())
        return "\n".join([
            f"trials ended: {self.trials} in {self.wall_s:.0f} s: {self.trials_per_hour:.0f} trials/hour; "
            f"{self.reports} reported results; {self.trials / self.trials_phase_s * 3600:.0f} trials/hour from the "
            f"first trial's start to the last one's end ({self.trials_phase_s:.0f} s)",
            f"GPU-seconds allocated to running trials: {100 * self.allocated_share:.1f} % while trials waited "
            f"(until the last one started), {100 * self.allocated_share_whole:.1f} % over the whole run",
            f"driver CPU per reported result: {self.driver_cpu_ms_per_result:.1f} ms in Tune's fit "
            f"({self.driver_cpu_ms_per_result_all:.1f} ms with its start and end)",
            f"report -> MLflow delay: p50 {self.delay_p50_s:.2f} s, p99 {self.delay_p99_s:.2f} s",
            f"searcher ms per suggestion, median by finished trials: {suggest}",
            f"Tune snapshots: {self.snapshots}, median {1000 * self.snapshot_median_s:.1f} ms, max "
            f"{1000 * self.snapshot_max_s:.1f} ms, {self.snapshot_total_s:.1f} s in all",
            f"driver peak memory: {self.driver_peak_mb:.0f} MB",
            "driver CPU in Tune's fit by thread, ms per result: " + ", ".join(
                f"{name} {1000 * seconds / max(self.reports, 1):.1f}"
                for name, seconds in sorted(self.fit_cpu_by_thread_s.items(), key=lambda item: -item[1])
                if 1000 * seconds / max(self.reports, 1) >= 0.5),
        ])


def figures(pg: Any, search: str, record: Path, driver_metrics: Path,
            drivers: Sequence[tuple[int, resource.struct_rusage]], *, wall_s: float, total_gpus: int,
            gpus_per_trial: int) -> Figures:
    """The run's figures; ``drivers`` holds each driver process's pid and resource usage."""
    store, trials = read_store(dsn_of(pg), search), read_record(record)
    notes = [json.loads(line) for line in driver_metrics.read_text().splitlines()]
    reports = sum(len(reports) for trial in trials.values() for reports in trial.epochs.values())
    fit_start = {note["pid"]: note["fit_start_cpu_s"] for note in notes if "fit_start_cpu_s" in note}
    fit_end = {note["pid"]: note["fit_end_cpu_s"] for note in notes if "fit_end_cpu_s" in note}
    cpu_all = sum(usage.ru_utime + usage.ru_stime for _, usage in drivers)
    # A killed driver's fit ends with it.
    cpu_fit = sum(fit_end.get(pid, usage.ru_utime + usage.ru_stime) - fit_start.get(pid, 0.0)
                  for pid, usage in drivers)
    snapshots = [note["snapshot_s"] for note in notes if "snapshot_s" in note]
    delays = report_delays(store, trials)
    return Figures(
        trials=sum(1 for _, _, status, _ in store.trial_runs if status in ENDED), wall_s=wall_s, reports=reports,
        trials_phase_s=trials_phase_s(trials),
        allocated_share=allocated_share(trials, total_gpus, gpus_per_trial, until_last_start=True),
        allocated_share_whole=allocated_share(trials, total_gpus, gpus_per_trial, until_last_start=False),
        driver_cpu_ms_per_result=1000 * cpu_fit / max(reports, 1),
        driver_cpu_ms_per_result_all=1000 * cpu_all / max(reports, 1),
        delay_p50_s=percentile(delays, 50), delay_p99_s=percentile(delays, 99),
        suggest_ms=suggest_by_finished([(n["finished"], n["suggest_s"]) for n in notes if "suggest_s" in n]),
        snapshots=len(snapshots), snapshot_median_s=statistics.median(snapshots) if snapshots else 0.0,
        snapshot_max_s=max(snapshots, default=0.0), snapshot_total_s=sum(snapshots),
        driver_peak_mb=max(usage.ru_maxrss for _, usage in drivers) / 1024,
        fit_cpu_by_thread_s=next((n["fit_cpu_by_thread_s"] for n in reversed(notes) if "fit_cpu_by_thread_s" in n),
                                 {}))


def trials_phase_s(trials: dict[str, TrialRecord]) -> float:
    intervals = [interval for trial in trials.values() for interval in _attempts(trial)]
    return max(stop for _, stop in intervals) - min(start for start, _ in intervals) if intervals else 0.0


def report_delays(store: Store, trials: dict[str, TrialRecord]) -> list[float]:
    """Seconds from each report of the primary metric to its point's write (the driver stamps it as it writes);
    of a point reported more than once, the last report before the write."""
    trial_of = {run_id: trial for run_id, trial, _, _ in store.trial_runs}
    delays = []
    for run_id, points in store.points.items():
        recorded = trials.get(trial_of.get(run_id, ""))
        for key, step, _, stamp in points:
            if key != PRIMARY or recorded is None or step not in recorded.epochs:
                continue
            written = stamp / 1000
            before = [t for t, _ in recorded.epochs[step] if t <= written + 0.001]
            if before:
                delays.append(written - max(before))
    return delays


def allocated_share(trials: dict[str, TrialRecord], total_gpus: int, gpus_per_trial: int, *,
                    until_last_start: bool) -> float:
    """The share of the cluster's GPU-seconds held by running stand-ins, from the first start to the last start
    (trials were still waiting for GPUs until then) or to the last end."""
    intervals = [interval for trial in trials.values() for interval in _attempts(trial)]
    if not intervals:
        return 0.0
    begin = min(start for start, _ in intervals)
    end = max(start for start, _ in intervals) if until_last_start else max(stop for _, stop in intervals)
    if end <= begin:
        return 0.0
    busy = sum(max(0.0, min(stop, end) - max(start, begin)) for start, stop in intervals)
    return busy * gpus_per_trial / (total_gpus * (end - begin))


def _attempts(trial: TrialRecord) -> list[tuple[float, float]]:
    """(start, end) of each process that ran the trial: it ends at its ``end``, or (killed) at its last report."""
    times = sorted([(t, "epoch") for reports in trial.epochs.values() for t, _ in reports]
                   + [(t, "end") for t in trial.ends])
    starts = sorted(trial.starts)
    attempts = []
    for i, start in enumerate(starts):
        limit = starts[i + 1] if i + 1 < len(starts) else float("inf")
        inside = [t for t, _ in times if start <= t < limit]
        attempts.append((start, max(inside, default=start)))
    return attempts


def suggest_by_finished(timings: list[tuple[int, float]]) -> dict[str, float]:
    """Median milliseconds per suggestion, for suggestions made with 0-99, 100-199, ... trials finished."""
    buckets: dict[int, list[float]] = defaultdict(list)
    for finished, seconds in timings:
        buckets[finished // 100 * 100].append(1000 * seconds)
    return {f"{low}-{low + 99}": statistics.median(values) for low, values in sorted(buckets.items())}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]
