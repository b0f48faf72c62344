"""The search at cluster scale: many trials on a multi-node Ray cluster, a tracking server on PostgreSQL, faults.

Starts on this machine, all on 127.0.0.1: a Ray head (`ray start --head`, no CPUs, so trials run on the workers)
and ``--nodes`` worker nodes (`ray start --address`), each declaring ``--gpus-per-node`` GPUs as a logical
resource; a throw-away PostgreSQL and an `mlflow server` on it; and the real search driver (its searcher, ASHA,
callbacks and Tracker) in its own process. Only training is replaced, by bench/standin.py's stand-in.

With ``--chaos``: once a quarter of the trials started, every ``--kill-every-s`` seconds a random worker node's
raylet and its processes are SIGKILLed (a node running trials, where one is), and the node started again
``--node-down-s`` later; once a quarter of the trials started, the MLflow server goes
down for ``--outage-s``; once half started, the driver is SIGKILLed and the search continued as `dettune resume`
continues it. At the end MLflow is checked against the stand-in's record (:mod:`bench.scale_check`).

    PYTHONPATH=. .venv/bin/python -m bench.scale [--trials 100] [--nodes 8] [--gpus-per-node 8]
        [--gpus-per-trial 4] [--epochs 9] [--epoch-s 1.0] [--objectives] [--chaos]
    PYTHONPATH=. .venv/bin/python -m bench.scale --trials 1000 [--objectives] searcher  # the searcher alone
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import random
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bench.scale_check import Figures, check_exactly_once, figures, suggest_by_finished
from cocodata.synth import write_dataset

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from services import (  # noqa: E402 - the tests' service helpers: one way to start each service
    RayHead,
    free_port,
    mlflow_server,
    node_processes,
    postgres,
    ray_head,
    start_worker_node,
)

NAME = "scale"
NODE_OBJECT_STORE_MB = 80
DRIVER_METRICS = "driver-metrics.jsonl"


@dataclass(frozen=True, kw_only=True)
class Settings:
    trials: int = 100
    nodes: int = 8
    gpus_per_node: int = 8
    gpus_per_trial: int = 4
    epochs: int = 9
    epoch_s: float = 1.0
    objectives: bool = False
    chaos: bool = False
    kill_every_s: float = 60.0
    node_kills: int = 1000
    node_down_s: float = 10.0
    outage_s: float = 60.0
    driver_kill: bool = True
    profile: bool = False
    """cProfile the driver's main thread (Tune's loop and the callbacks) into driver-<pid>.prof."""

    @property
    def concurrent(self) -> int:
        return self.nodes * self.gpus_per_node // self.gpus_per_trial


def space_doc(settings: Settings, data_root: Path) -> dict[str, Any]:
    """A TPE + ASHA search over knobs that leave the model as it is (the driver builds each model once)."""
    doc: dict[str, Any] = {
        "name": NAME, "base": "mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py",
        "data": {"root": str(data_root), "train": "train.json", "val": "val.json"},
        "metric": "val/bbox_mAP",
        "budget": {"epochs": settings.epochs, "trials": settings.trials, "gpus_per_trial": settings.gpus_per_trial,
                   "workers_per_trial": 1, "cpus_per_worker": 1, "max_concurrent": settings.concurrent,
                   # node kills land on running trials again and again: retries must outlast them
                   "max_retries": 20},
        "search": {"algorithm": "tpe", "seed": 0},
        "scheduler": {"type": "asha", "grace_epochs": 1, "reduction_factor": 3},
        "space": {"lr": {"loguniform": [0.001, 0.1]}, "schedule": {"choice": ["step", "cosine"]},
                  "batch_size": {"choice": [2, 4]}},
        "fixed": {"backbone": "r18", "preset": "tiny", "scale": [160, 160], "optimizer": "sgd"},
    }
    if settings.objectives:
        doc["objectives"] = [{"metric": "inference/fps", "mode": "max"}]
    return doc


# --- the driver process ------------------------------------------------------------------------------------------

def drive(args: argparse.Namespace) -> int:
    """The search driver, as `dettune search`/`resume` runs it, with the stand-in trial and timers around the
    searcher's suggestions and Tune's snapshots; the timings go to ``--metrics`` as they happen."""
    from bench.standin import make_standin
    from search.driver import SearchOptions, resume_options, run_search
    from tracking_names import use_credentials

    metrics = Path(args.metrics)
    _instrument(metrics)
    storage = Path(args.storage)
    if args.resume:
        options = resume_options(NAME, storage, tracking_uri=use_credentials(args.tracking_uri))
    else:
        options = SearchOptions(space_file=Path(args.space), address=args.address, tracking_uri=args.tracking_uri,
                                storage=storage, tracking_timeout_s=args.tracking_timeout_s)
    train = make_standin(args.epoch_s, Path(args.record))
    if args.profile:
        with cProfile.Profile() as profile:
            outcome = run_search(options, train=train)
        profile.dump_stats(metrics.parent / f"driver-{os.getpid()}.prof")
    else:
        outcome = run_search(options, train=train)
    print(f"finished trials: {outcome.finished}; best: {outcome.best_trial_id}", flush=True)
    return 0


def _instrument(metrics: Path) -> None:
    from ray.tune import Tuner
    from ray.tune.execution.tune_controller import TuneController

    from search.optuna_search import ObjectiveSearch

    def note(entry: dict[str, Any]) -> None:
        with metrics.open("a") as file:
            file.write(json.dumps({"pid": os.getpid(), **entry}) + "\n")

    suggest, save, fit = ObjectiveSearch.suggest, TuneController.save_to_dir, Tuner.fit

    def timed_suggest(self: Any, trial_id: str) -> Any:
        finished = sum(1 for trial in self.study.get_trials(deepcopy=False) if trial.state.is_finished())
        start = time.perf_counter()
        found = suggest(self, trial_id)
        note({"suggest_s": time.perf_counter() - start, "finished": finished})
        return found

    def timed_save(self: Any) -> None:
        start = time.perf_counter()
        save(self)
        note({"snapshot_s": time.perf_counter() - start, "trials": len(self.get_trials())})

    def timed_fit(self: Any) -> Any:
        before = cpu_by_thread()
        note({"fit_start_cpu_s": cpu_s()})
        try:
            return fit(self)
        finally:
            after = cpu_by_thread()
            note({"fit_end_cpu_s": cpu_s(),
                  "fit_cpu_by_thread_s": {name: after[name] - before.get(name, 0.0) for name in after}})

    ObjectiveSearch.suggest, TuneController.save_to_dir, Tuner.fit = timed_suggest, timed_save, timed_fit


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def cpu_by_thread() -> dict[str, float]:
    """CPU seconds of the driver's live threads, summed by name: Python's thread names (Tune's loop is the main
    thread), else the OS's (Ray's own threads name themselves)."""
    import threading

    python_names = {thread.native_id: thread.name for thread in threading.enumerate()}
    ticks = os.sysconf("SC_CLK_TCK")
    by_name: dict[str, float] = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            stat = (task / "stat").read_text()
            name = python_names.get(int(task.name)) or (task / "comm").read_text().strip()
        except OSError:  # the thread ended meanwhile
            continue
        utime, stime = stat.rsplit(")", 1)[1].split()[11:13]  # fields 14 and 15, after the command's parentheses
        by_name[name] = by_name.get(name, 0.0) + (int(utime) + int(stime)) / ticks
    return by_name


# --- the searcher alone ---------------------------------------------------------------------------------------------

def replay_searcher(settings: Settings) -> dict[str, float]:
    """The real searcher told ``settings.trials`` stand-in trials one after another, every epoch reported, without
    Ray: milliseconds per suggestion by finished trials, as the search's own figure can't reach 1,000 here."""
    from bench.standin import curve_row
    from search.optuna_search import ObjectiveSearch
    from spaces.schema import Space

    searcher = ObjectiveSearch(Space.from_json(space_doc(settings, Path("data"))))
    timings = []
    for finished in range(settings.trials):
        trial_id = f"t{finished}"
        start = time.perf_counter()
        config = searcher.suggest(trial_id)
        timings.append((finished, time.perf_counter() - start))
        for epoch in range(1, settings.epochs + 1):
            row = {**curve_row(config, epoch, settings.epochs), "training_iteration": epoch}  # as Tune adds it
            searcher.on_trial_result(trial_id, row)
        searcher.on_trial_complete(trial_id, row)
    return suggest_by_finished(timings)


# --- the cluster, the tracking server, the faults ------------------------------------------------------------------

@dataclass
class Cluster:
    head: RayHead
    settings: Settings
    ports: list[int] = field(default_factory=list)

    def start_node(self, port: int) -> None:
        start_worker_node(self.head, node_manager_port=port, num_cpus=self.settings.concurrent // self.settings.nodes,
                          num_gpus=self.settings.gpus_per_node, object_store_mb=NODE_OBJECT_STORE_MB)

    def busy_workers(self, port: int) -> int:
        """The node's worker processes running a task or actor (Ray titles an idle pooled worker ``ray::IDLE``)."""
        titles = [_cmdline(pid) for pid in node_processes(port)]
        return sum(1 for title in titles if title.startswith(b"ray::") and not title.startswith(b"ray::IDLE"))

    def kill_node(self, port: int) -> int:
        pids = node_processes(port)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
        return len(pids)


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:  # it ended meanwhile
        return b""


@contextmanager
def cluster(settings: Settings) -> Iterator[Cluster]:
    with ray_head(num_cpus=0, object_store_mb=NODE_OBJECT_STORE_MB) as head:
        running = Cluster(head, settings)
        for _ in range(settings.nodes):
            port = free_port()
            running.start_node(port)
            running.ports.append(port)
        yield running


class TrackingServer:
    """The `mlflow server` on PostgreSQL, which can be taken down and brought back on the same port."""

    def __init__(self, folder: Path, backend_uri: str) -> None:
        self._folder, self._backend_uri, self._port = folder, backend_uri, free_port()
        self._stack: ExitStack | None = None
        self.url = ""

    def start(self) -> None:
        self._stack = ExitStack()
        self.url = self._stack.enter_context(mlflow_server(self._folder, self._port, backend_uri=self._backend_uri))

    def stop(self) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = None


@dataclass
class Driver:
    """The driver's processes, one after another (the second one resumes), with what each one cost."""

    args: list[str]
    env: dict[str, str]
    log: Path
    process: subprocess.Popen[bytes] | None = None
    usage: list[tuple[int, resource.struct_rusage]] = field(default_factory=list)  # (pid, usage)
    returncode: int | None = None

    def start(self, *extra: str) -> None:
        self.returncode = None
        with self.log.open("ab") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "bench.scale", "drive", *self.args, *extra],
                                            cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT)

    def poll(self) -> int | None:
        """The exit status once the current process ended (reaped here, for its resource usage), else None."""
        assert self.process is not None
        pid, status, usage = os.wait4(self.process.pid, os.WNOHANG)
        if pid == 0:
            return None
        self.process.returncode = self.returncode = os.waitstatus_to_exitcode(status)
        self.usage.append((pid, usage))
        return self.returncode

    def kill(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)
        while self.poll() is None:
            time.sleep(0.1)


def started_trials(record: Path) -> int:
    return sum(1 for _ in record.glob("*.jsonl"))


@dataclass(frozen=True)
class Run:
    figures: Figures
    problems: list[str]
    """What the exactly-once check found; empty when MLflow holds exactly what the stand-in reported."""
    faults: list[str]


def run(settings: Settings, work: Path) -> Run:
    """Runs one search on a fresh cluster and tracking server: its figures, what the check found, the faults."""
    os.environ["PYTHONPATH"] = str(REPO)  # the nodes' workers import this checkout's code, and the stand-in
    data = work / "data"
    write_dataset(data, images=8, size=160, seed=0)
    space_file = work / "space.yaml"
    space_file.write_text(yaml.safe_dump(space_doc(settings, data), sort_keys=False))
    record, storage = work / "record", work / "runs"
    record.mkdir()
    events: list[str] = []
    with postgres() as pg, cluster(settings) as nodes:
        server = TrackingServer(work, pg.uri)
        server.start()
        try:
            driver = Driver(args=["--space", str(space_file), "--address", nodes.head.gcs_address,
                                  "--tracking-uri", server.url, "--storage", str(storage), "--record", str(record),
                                  "--metrics", str(work / DRIVER_METRICS), "--epoch-s", str(settings.epoch_s),
                                  "--tracking-timeout-s", str(max(600.0, 4 * settings.outage_s)),
                                  *(["--profile"] if settings.profile else [])],
                            # RAY_ADDRESS: how `dettune resume` (which takes no --address) finds the cluster
                            env={**nodes.head.env, "PYTHONPATH": str(REPO), "RAY_ADDRESS": nodes.head.gcs_address},
                            log=work / "driver.log")
            start = time.time()
            driver.start()
            try:
                _watch(driver, nodes, server, settings, record, events)
            finally:  # interrupted: the driver is ours to end
                if driver.returncode is None:
                    driver.kill()
            wall_s = time.time() - start
            if driver.returncode != 0:
                raise RuntimeError(f"the driver failed ({driver.returncode}); its log: {work / 'driver.log'}")
            problems = check_exactly_once(pg, NAME, record)
            found = figures(pg, NAME, record, work / DRIVER_METRICS, driver.usage, wall_s=wall_s,
                            total_gpus=settings.nodes * settings.gpus_per_node, gpus_per_trial=settings.gpus_per_trial)
        finally:
            server.stop()
    return Run(found, problems, events)


def _watch(driver: Driver, nodes: Cluster, server: TrackingServer, settings: Settings, record: Path,
           events: list[str]) -> None:
    """Waits for the driver to finish; with chaos, kills nodes, the tracking server and the driver meanwhile."""
    rng = random.Random(0)
    start = time.monotonic()
    next_kill = start + settings.kill_every_s
    down: list[tuple[float, int]] = []  # (when to restart, node port)
    outage_done = driver_killed = not settings.chaos
    outage_ends: float | None = None
    driver_killed = driver_killed or not settings.driver_kill

    def say(text: str) -> None:
        events.append(f"[{time.monotonic() - start:7.1f} s] {text}")

    while driver.poll() is None:
        time.sleep(0.5)
        now, started = time.monotonic(), started_trials(record)
        if not settings.chaos:
            continue
        # kills start once a quarter of the trials started (the driver's own start takes a minute or more here),
        # and hit a node running trials where one is: a kill of an idle node proves nothing
        if (now >= next_kill and started >= settings.trials // 4
                and sum("SIGKILL node" in event for event in events) < settings.node_kills):
            up = [port for port in nodes.ports if port not in {p for _, p in down}]
            port = rng.choice([port for port in up if nodes.busy_workers(port)] or up)
            say(f"SIGKILL node {port}'s raylet and its {nodes.kill_node(port)} processes")
            down.append((now + settings.node_down_s, port))
            next_kill = now + settings.kill_every_s
        for back in [entry for entry in down if entry[0] <= now]:
            down.remove(back)
            nodes.start_node(back[1])
            say(f"node {back[1]} started again")
        if not outage_done and started >= settings.trials // 4:
            server.stop()
            outage_done, outage_ends = True, now + settings.outage_s
            say(f"MLflow server down for {settings.outage_s:.0f} s")
        if outage_ends is not None and now >= outage_ends:
            server.start()
            outage_ends = None
            say("MLflow server back")
        if not driver_killed and started >= settings.trials // 2 and outage_ends is None:
            driver.kill()
            driver_killed = True
            say("driver SIGKILLed; resuming")
            driver.start("--resume")
    if outage_ends is not None:
        server.start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("searcher", help="time the searcher alone over --trials (and --objectives), no cluster")
    drive_args = commands.add_parser("drive", help="(internal) the search driver's process")
    for flag in ("--space", "--address", "--tracking-uri", "--storage", "--record", "--metrics"):
        drive_args.add_argument(flag)
    drive_args.add_argument("--epoch-s", type=float, required=True)
    drive_args.add_argument("--tracking-timeout-s", type=float, default=600.0)
    drive_args.add_argument("--resume", action="store_true")
    drive_args.add_argument("--profile", action="store_true")
    defaults = Settings()
    for name, value in defaults.__dict__.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
        else:
            parser.add_argument(flag, type=type(value), default=value)
    parser.add_argument("--work", type=Path, help="keep the run's files here (default: a temp dir)")
    args = parser.parse_args(argv)
    if args.command == "drive":
        return drive(args)
    settings = Settings(**{name: getattr(args, name) for name in defaults.__dict__})
    if args.command == "searcher":
        timings = replay_searcher(settings)
        print(f"searcher ms per suggestion, median by finished trials ({settings.trials} trials, objectives "
              f"{'on' if settings.objectives else 'off'}): " + ", ".join(f"{k}: {v:.1f}" for k, v in timings.items()))
        return 0
    print(f"load before: {os.getloadavg()[0]:.2f}; {settings}", flush=True)
    with tempfile.TemporaryDirectory(prefix="scale-") as temp:
        work = args.work or Path(temp)
        work.mkdir(parents=True, exist_ok=True)
        done = run(settings, work)
    print("\n".join(done.faults))
    print(done.figures.text())
    print(f"load after: {os.getloadavg()[0]:.2f}")
    print("exactly-once check: " + ("passed" if not done.problems else f"{len(done.problems)} problems"))
    for problem in done.problems[:30]:
        print("  " + problem)
    return 1 if done.problems else 0


if __name__ == "__main__":
    sys.exit(main())
