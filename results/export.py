"""``dettune export``: a search's best checkpoint as a self-contained MMDetection model directory.

``DIR/`` holds:

- ``config.py``: the trial's exact mmdet config (only ``resume``/``load_from`` cleared), for mmdet's own tools;
- ``checkpoint.pth``: the weights as a checkpoint that torch's default ``weights_only=True`` loading accepts
  (``state_dict`` plus ``meta`` with ``dataset_meta`` classes, no optimizer or message-hub state), so
  ``init_detector``, ``DetInferencer`` and ``tools/test.py`` load it without any allow-list;
- ``metrics.json``: which trial and epoch, chosen by which metric within which limits, that epoch's log columns,
  and what the limits traded: the primary metric and costs of the exported trial and of the best trial without them;
- ``params.json``: the trial's knob values.

Limits (``--min-fps``, ``--max-gflops``, and the space's ``constraints``) apply to a trial's costs as last
measured; with limits the best is the best trial by the metric among those that meet them all.

Checkpoints are found in the Ray experiment directory the parent run records (``dettune.storage``): each
trial's ``result.json`` names the checkpoint directory of every epoch, and only those still on disk count (Ray
keeps each trial's best two). Exporting while the search runs therefore hands over the best checkpoint so far.
The same files are logged on the trial's MLflow run under ``export/epoch_<n>`` and registered as a new version
of the registered model named after the search.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from mlflow.entities import Run
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

from mmconfigs.build import load_config
from results.report import format_value, record_values
from results.store import SearchHandle, add_tracking_flag, open_search, open_tracking
from spaces.errors import BadArgument, NotFound, UserError
from spaces.objectives import COST_METRICS, FPS_METRIC, GFLOPS_METRIC, is_feasible, shortfall
from spaces.schema import Limit, Space
from tracking_names import TAG_EXP_NUM, TAG_STORAGE, is_log_column
from tracking_names.storage import Storage, open_storage
from trainers.checkpoint import CHECKPOINT_FILE, TRIAL_CONFIG, load_checkpoint
from trainers.coco_metric import plain_mmdet
from trainers.metrics import EPOCH, known_mode

METRICS_FILE = "metrics.json"
PARAMS_FILE = "params.json"
EXPORTED_FILES = (TRIAL_CONFIG, CHECKPOINT_FILE, METRICS_FILE, PARAMS_FILE)
EXPORT_ARTIFACTS = "export"
_META_KEYS = ("dataset_meta", "epoch", "iter", "cfg", "seed", "mmengine_version")


class NothingToExport(UserError):
    """The search has no checkpoint to export (yet, or any more); the message says when to try again."""


@dataclass(frozen=True, kw_only=True)
class Candidate:
    """A checkpoint in Ray storage and the result Ray recorded with it."""

    trial_id: str
    epoch: int
    result: dict[str, Any]
    source: Storage

    @property
    def directory(self) -> Path:
        """The checkpoint on this machine (from an object store, downloaded on first use)."""
        return self.source.on_disk()

    def value(self, metric: str) -> float | None:
        """The result's ``metric``, or None where it is missing or not finite."""
        value = self.result.get(metric)
        return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


@dataclass(frozen=True, kw_only=True)
class Export:
    """What :func:`export_best` wrote and registered."""

    out: Path
    exp_num: str
    candidate: Candidate
    metric: str
    version: ModelVersion


def metric_mode(space: Space, metric: str) -> str:
    """The space's mode for its metric and objectives; for another column, the one its kind says.

    Raises:
        BadArgument: A column with no better direction (the learning rate).
    """
    modes = dict(space.directions())
    mode = modes.get(metric) or known_mode(metric)
    if mode is None:
        raise BadArgument(f"dettune does not know whether a higher or a lower {metric} is better: pass --metric "
                          f"a score, loss or cost (e.g. {space.metric})")
    return mode


def checkpoint_candidates(experiment_dir: Storage) -> list[Candidate]:
    """Every reported epoch of every trial whose checkpoint (weights and config) is still in Ray storage."""
    files = experiment_dir.files()  # one listing, also of an object store
    candidates = []
    for results in sorted(path for path in files if path.count("/") == 1 and path.endswith("/result.json")):
        trial = results.split("/")[0]
        for result in _results(experiment_dir / results):
            name = result.get("checkpoint_dir_name")
            if name and {f"{trial}/{name}/{CHECKPOINT_FILE}", f"{trial}/{name}/{TRIAL_CONFIG}"} <= files:
                candidates.append(Candidate(trial_id=str(result["trial_id"]), epoch=int(result[EPOCH]),
                                            result=result, source=experiment_dir / trial / str(name)))
    return candidates


def _results(path: Storage) -> Iterator[dict[str, Any]]:
    for line in (path.read_text() or "").splitlines():
        try:
            yield json.loads(line)
        except json.JSONDecodeError:  # the line Ray is writing right now
            continue


def ranked_candidates(candidates: Sequence[Candidate], metric: str, mode: str) -> list[Candidate]:
    """The candidates that have ``metric``, best first (earlier epochs first among equals).

    Raises:
        NothingToExport: No candidate at all.
        BadArgument: No candidate has ``metric`` (the message lists the metrics there are).
    """
    if not candidates:
        raise NothingToExport("no trial checkpoint is on disk yet: wait until a trial finishes its first epoch")
    scored = [c for c in candidates if c.value(metric) is not None]
    if not scored:
        known = sorted({k for c in candidates for k in c.result if is_log_column(k)})
        raise BadArgument(f"no checkpoint has the metric {metric!r}: pass --metric with one of {', '.join(known)}")
    sign = -1.0 if mode == "max" else 1.0
    return sorted(scored, key=lambda c: sign * (c.value(metric) or 0.0))


def experiment_dir(search: SearchHandle) -> Storage:
    """The search's Ray experiment directory, as its parent run records it: a local folder or an object store's.

    Raises:
        NothingToExport: The search does not record it.
        NotFound: It is not on this machine, or no longer in its object store.
        BadArgument: Its object store cannot be opened (credentials, endpoint).
    """
    recorded = search.parent.data.tags.get(TAG_STORAGE)
    if not recorded:
        raise NothingToExport(f"search {search.name} does not record its Ray experiment directory "
                         f"(tag {TAG_STORAGE}): it was run by an older dettune; rerun it to export")
    storage = open_storage(recorded)
    if not storage.exists():
        where = ("is not on this machine: run export where the search's --storage is mounted" if storage.is_local
                 else "is no longer there: check the URI's bucket and prefix")
        raise NotFound(f"the Ray experiment directory of search {search.name}, {storage}, {where}")
    return storage


class NoTrialMeetsLimits(NothingToExport):
    """No finished trial meets the export's limits; the message lists the closest ones."""


@dataclass(frozen=True, kw_only=True)
class Limits:
    """The export's limits on top of the space's ``constraints``: a trial outside one is never exported."""

    flags: Mapping[str, Limit] = field(default_factory=dict)
    space: Mapping[str, Limit] = field(default_factory=dict)

    def met(self, values: Mapping[str, float]) -> bool:
        return is_feasible(values, self.space) and is_feasible(values, self.flags)

    def shortfall(self, values: Mapping[str, float]) -> float:
        """How far the values are from meeting both sets of limits (a metric may be in both)."""
        return shortfall(values, self.space) + shortfall(values, self.flags)

    def describe(self) -> dict[str, str]:
        return {m: limit.text() for limits in (self.space, self.flags) for m, limit in limits.items()}


def limits_from_flags(min_fps: float | None, max_gflops: float | None) -> dict[str, Limit]:
    """``--min-fps`` / ``--max-gflops`` as limits."""
    limits = {}
    if min_fps is not None:
        limits[FPS_METRIC] = Limit(min=min_fps)
    if max_gflops is not None:
        limits[GFLOPS_METRIC] = Limit(max=max_gflops)
    return limits


def feasible_trials(search: SearchHandle, limits: Limits) -> tuple[set[str], dict[str, dict[str, float]]]:
    """The trial ids that meet the limits, and every trial's values by trial id.

    Raises:
        NoTrialMeetsLimits: None does; the message names the closest three with their costs.
    """
    trials = search.trials()
    values = {t.trial_id: record_values(t, search.space) for t in trials}
    feasible = {trial_id for trial_id, v in values.items() if limits.met(v)}
    if feasible or not limits.describe():
        return feasible, values
    closest = sorted(trials, key=lambda t: limits.shortfall(values[t.trial_id]))[:3]
    shown = "; ".join(f"{t.exp_num}: " + ", ".join(f"{m} {format_value(m, values[t.trial_id].get(m))}"
                                                   for m in limits.describe()) for t in closest)
    wanted = ", ".join(f"{m} {text}" for m, text in limits.describe().items())
    raise NoTrialMeetsLimits(f"no trial of {search.name} meets {wanted} (closest: {shown}): relax the limits, "
                             "or search further with them as the space's constraints")


def export_best(search: SearchHandle, out: Path, *, metric: str | None = None,
                limits: Mapping[str, Limit] | None = None) -> Export:
    """Writes the best checkpoint's model directory to ``out`` and registers it as a new model version.

    Args:
        search: The search.
        out: The model directory to write.
        metric: Rank by this metric (default: the space's).
        limits: Extra limits (``--min-fps`` ...); the space's constraints apply as well.
    """
    metric = metric or search.space.metric
    bounds = Limits(flags=limits or {}, space=search.space.constraints)
    feasible, values = feasible_trials(search, bounds)
    candidates = checkpoint_candidates(experiment_dir(search))
    ranked = ranked_candidates(candidates, metric, metric_mode(search.space, metric))
    if bounds.describe():
        ranked = [c for c in ranked if c.trial_id in feasible]
        if not ranked:
            raise NothingToExport("the trials that meet the limits have no checkpoint on disk (Ray keeps each trial's "
                             "best two): wait for them to report, or relax the limits")
    for candidate in ranked:
        try:
            write_model(candidate, out)
        except FileNotFoundError:  # Ray deleted it for a better one since we looked: that one is on the list
            continue
        run = search.run_of(candidate.trial_id)
        traded = _traded(search, values, candidates, candidate, metric, bounds)
        _write_json(out / METRICS_FILE, {**_metrics(search, candidate, run, metric), **traded})
        _write_json(out / PARAMS_FILE, trial_params(search.space, candidate))
        version = register(search, run, out, candidate.epoch)
        return Export(out=out, exp_num=run.data.tags.get(TAG_EXP_NUM, run.info.run_id), candidate=candidate,
                      metric=metric, version=version)
    raise NothingToExport("every checkpoint was replaced while exporting: run export again")


def write_model(candidate: Candidate, out: Path) -> None:
    """config.py and a weights-only checkpoint.pth (``FileNotFoundError`` if Ray removed the source)."""
    checkpoint = load_checkpoint(candidate.directory / CHECKPOINT_FILE)
    cfg = load_config(candidate.directory / TRIAL_CONFIG)
    cfg.resume = False
    cfg.load_from = None
    # The trial's unique singleton name would follow the model into every tool that loads it.
    cfg.visualizer.name = "visualizer"
    plain_mmdet(cfg.get("val_evaluator"))  # dettune's evaluator is registered only where dettune is imported
    meta: dict[str, Any] = checkpoint.get("meta") or {}  # type: ignore[assignment]
    out.mkdir(parents=True, exist_ok=True)
    cfg.dump(str(out / TRIAL_CONFIG))
    torch.save({"state_dict": checkpoint["state_dict"], "meta": {k: meta[k] for k in _META_KEYS if k in meta}},
               out / CHECKPOINT_FILE)


def _metrics(search: SearchHandle, candidate: Candidate, run: Run, metric: str) -> dict[str, Any]:
    metrics = {k: v for k, v in candidate.result.items() if is_log_column(k) and isinstance(v, (int, float))}
    for cost in COST_METRICS:  # measured at some epochs only
        if cost not in metrics and cost in run.data.metrics:
            metrics[cost] = run.data.metrics[cost]
    return {"search": search.name, "exp_num": run.data.tags.get(TAG_EXP_NUM), "trial_id": candidate.trial_id,
            "mlflow_run_id": run.info.run_id, "epoch": candidate.epoch,
            "selected_by": {"metric": metric, "mode": metric_mode(search.space, metric)}, "metrics": metrics}


def _traded(search: SearchHandle, values: Mapping[str, Mapping[str, float]], candidates: Sequence[Candidate],
            chosen: Candidate, metric: str, limits: Limits) -> dict[str, Any]:
    """The limits, and the metric and costs of the exported trial against the best trial without the limits."""
    if not limits.describe():
        return {}
    unconstrained = ranked_candidates(candidates, metric, metric_mode(search.space, metric))[0]

    def summary(candidate: Candidate) -> dict[str, Any]:
        costs = values.get(candidate.trial_id, {})
        return {"trial_id": candidate.trial_id, "epoch": candidate.epoch, metric: candidate.value(metric),
                **{m: costs[m] for m in COST_METRICS if m in costs}}

    return {"limits": limits.describe(), "traded": {"exported": summary(chosen),
                                                    "best_without_limits": summary(unconstrained)}}


def trial_params(space: Space, candidate: Candidate) -> dict[str, Any]:
    """The trial's knob values, as the trial got them."""
    return space.point(candidate.result.get("config", {}))


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def register(search: SearchHandle, run: Run, out: Path, epoch: int) -> ModelVersion:
    """Logs the exported files on the trial's run and adds them as a version of the search's registered model."""
    client = search.client
    artifact_path = f"{EXPORT_ARTIFACTS}/epoch_{epoch}"
    for name in EXPORTED_FILES:
        client.log_artifact(run.info.run_id, str(out / name), artifact_path)
    try:
        client.create_registered_model(search.name, description=f"Best checkpoints of the dettune search "
                                                                f"{search.name}, one version per export")
    except MlflowException as error:
        if error.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
    return client.create_model_version(search.name, source=f"{run.info.artifact_uri}/{artifact_path}",
                                       run_id=run.info.run_id,
                                       tags={TAG_EXP_NUM: run.data.tags.get(TAG_EXP_NUM, ""), EPOCH: str(epoch)})


# --- command line ---------------------------------------------------------------------------------------

def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Adds ``dettune export NAME --out DIR [--metric M] [--tracking-uri URI]``."""
    parser = commands.add_parser("export", help="write the best checkpoint as an mmdet model dir and register it")
    parser.add_argument("name", help="the search's name")
    parser.add_argument("--out", required=True, help="output directory (config.py, checkpoint.pth, metrics.json, "
                                                     "params.json)")
    parser.add_argument("--metric", help="choose the best by this metric (default: the space's metric), in the "
                                         "space's direction for its objectives; else scores and FPS higher, "
                                         "losses, GFLOPs and parameters lower")
    parser.add_argument("--min-fps", type=float, help=f"only trials whose {FPS_METRIC} is at least this")
    parser.add_argument("--max-gflops", type=float, help=f"only trials whose {GFLOPS_METRIC} is at most this")
    parser.add_argument("--ensemble", metavar="RUN", help="export this `dettune ensemble` run instead (its run name, "
                                                          "e.g. NAME-ensemble-1): every member, its TTA and weight, "
                                                          "and the fusion, for `dettune predict`")
    add_tracking_flag(parser)
    parser.set_defaults(handler=run_export)


def run_export(args: argparse.Namespace) -> int:
    """The ``export`` command."""
    search = open_search(open_tracking(args.tracking_uri), args.name)
    if args.ensemble:
        from results.ensemble import export_ensemble  # results.ensemble builds on this module

        print(f"exported ensemble {args.ensemble} to {export_ensemble(search, args.ensemble, Path(args.out)).parent}")
        return 0
    done = export_best(search, Path(args.out), metric=args.metric,
                       limits=limits_from_flags(args.min_fps, args.max_gflops))
    value = format_value(done.metric, done.candidate.value(done.metric))
    print(f"exported {done.exp_num} (trial {done.candidate.trial_id}, epoch {done.candidate.epoch}, "
          f"{done.metric} {value}) to {done.out}")
    print(f"registered model {done.version.name} version {done.version.version}: {done.version.source}")
    return 0
