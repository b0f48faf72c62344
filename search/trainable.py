"""The Ray Tune function trainable: one Tune trial trains one point of the space.

With one worker per trial the trainer runs inside the Tune trial itself (no Ray Train controller: each
TorchTrainer start costs 15-20 s on a small machine). With N workers the trial launches a Ray Train
``TorchTrainer`` (Train V2 can't be handed to the Tuner) whose workers run mmengine with ``launcher='pytorch'``
on the process group Ray made, and ``TuneReportCallback`` forwards rank 0's reports to Tune.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import ray.tune
import torch
from ray.train import Checkpoint

from cocodata.dataset import open_dataset
from search.rung import with_rung_score
from spaces.schema import Space
from tracking_names.storage import Storage
from trainers.checkpoint import CHECKPOINT_FILE, TRIAL_CONFIG
from trainers.hook import TrialDiverged
from trainers.inference import fps_settings
from trainers.trial import TRIAL_LOG, TrialDataError, TrialSetupFailed, TrialSpec, run_trial

FAILURE_FILE = "failure.txt"
# Ray leaves CUDA_VISIBLE_DEVICES alone for a task given no GPU (ray#54868) unless its workers have this set.
HIDE_UNASSIGNED_GPUS = "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO"
SETUP_FAILURE_FILE = "setup-failure.txt"
SETUP_FAILED = "setup failed: "
# Failures that a retry would only repeat: the trial ends at once, marked failed, instead of being retried.
UNRECOVERABLE: tuple[type[BaseException], ...] = (TrialDiverged, torch.OutOfMemoryError, TrialDataError)
DATA_ERROR = TrialDataError.__name__  # how a failure reason read from failure.txt starts for a bad sample


@dataclass(frozen=True, kw_only=True)
class TrialPlan:
    """What every trial of one search shares; built by the driver with absolute paths, sent to each trial."""

    space: dict[str, Any]  # Space.to_json(): decodes sampled values inside the trial
    base: str
    data_root: str
    workers: int = 1
    cpus_per_worker: int = 1
    gpus_per_worker: float = 0  # below 1 with one worker: trials share a GPU
    storage: str
    """Ray storage: a local folder or a URI (:class:`~tracking_names.storage.Storage`)."""
    name: str
    pretrained: Mapping[str, str] = field(default_factory=dict)

    @cached_property
    def parsed_space(self) -> Space:
        """The space, checked once per process rather than on every trial event that needs it."""
        return Space.from_json(self.space)

    def point(self, sampled: Mapping[str, Any]) -> dict[str, Any]:
        """The full knob values of a trial: the space's fixed knobs plus the sampled ones, decoded."""
        return self.parsed_space.point(sampled)

    def run_params(self, sampled: Mapping[str, Any]) -> dict[str, Any]:
        """What a trial's MLflow run records as params: its knobs and how its FPS is measured."""
        return {**self.point(sampled), **fps_settings("cuda" if self.gpus_per_worker else "cpu")}

    @property
    def trials_dir(self) -> Path:
        """The trials' own files: next to Ray's results in a local (shared) storage folder; with an object store,
        in a local folder of the user's cache, on the node that runs the trial."""
        return Storage(self.storage).local_root() / self.name / "trials"

    def work_dir(self, trial_id: str, rank: int) -> Path:
        """Where a worker's mmengine work dir and trial.log live."""
        return self.trials_dir / trial_id / f"rank{rank}"

    def failure_file(self, trial_id: str) -> Path:
        """Holds the reason a trial failed for good (diverged, out of memory); the driver reads it."""
        return self.trials_dir / trial_id / FAILURE_FILE

    def setup_failure_file(self, trial_id: str) -> Path:
        """Holds the reason a trial failed before its first training iteration (config, file, import, shape)."""
        return self.trials_dir / trial_id / SETUP_FAILURE_FILE

    def _shared_reason(self, trial_id: str, file_name: str) -> Storage | None:
        """A reason's copy in an object store, which the driver reads when the trial ran on another node (the
        local file is on that node); None for a storage folder, which the trials' folder lies in."""
        storage = Storage(self.storage)
        return None if storage.is_local else storage / self.name / "trials" / trial_id / file_name

    def record_failure(self, trial_id: str, exc: BaseException) -> None:
        """Keeps the first reason: with several workers, the rank that failed first knows why."""
        reason = f"{type(exc).__name__}: {exc}"
        with contextlib.suppress(FileExistsError), self.failure_file(trial_id).open("x") as file:
            file.write(reason)
            self._share(trial_id, FAILURE_FILE, reason)

    def record_setup_failure(self, trial_id: str, reason: str) -> None:
        self.setup_failure_file(trial_id).write_text(reason)
        self._share(trial_id, SETUP_FAILURE_FILE, reason)

    def _share(self, trial_id: str, file_name: str, reason: str) -> None:
        shared = self._shared_reason(trial_id, file_name)
        if shared is not None:
            shared.write_text(reason)

    def _reason(self, trial_id: str, path: Path) -> str | None:
        """The reason in this node's file, else in the object store's copy."""
        local = _read(path)
        if local is not None:
            return local
        shared = self._shared_reason(trial_id, path.name)
        text = shared.read_text() if shared is not None else None
        return text.strip() if text is not None else None

    def setup_failure_of(self, trial_id: str) -> str | None:
        return self._reason(trial_id, self.setup_failure_file(trial_id))

    def setup_failures(self) -> dict[str, str]:
        """Trial id -> reason, for every trial of this search that failed at setup so far on this node (Tune's
        loop asks at each step until a trial has trained: an object store is not listed that often)."""
        trials = self.trials_dir
        return {path.parent.name: path.read_text().strip() for path in trials.glob(f"*/{SETUP_FAILURE_FILE}")}

    def failure_of(self, trial_id: str) -> str | None:
        """Why the trial ended itself as failed (never retried), or None."""
        setup = self.setup_failure_of(trial_id)
        return SETUP_FAILED + setup if setup is not None else self._reason(trial_id, self.failure_file(trial_id))

    def trial_log(self, trial_id: str) -> Path:
        """Rank 0's log: the Runner's output and the traceback of whatever ended the trial."""
        return self.work_dir(trial_id, 0) / TRIAL_LOG

    @property
    def dataloader_workers(self) -> int:
        """One CPU of each worker trains; the others load data."""
        return max(0, self.cpus_per_worker - 1)


TrialFunction = Callable[[dict[str, Any], TrialPlan], None]
"""What a trial runs: the Tune function trainable's signature, bound to the search's plan."""


def tune_trial(config: dict[str, Any], plan: TrialPlan) -> None:
    """The Tune function trainable (bound to ``plan`` with ``tune.with_parameters``)."""
    trial_id = ray.tune.get_context().get_trial_id()
    if plan.workers == 1:
        _train(config, plan, trial_id, get_checkpoint=ray.tune.get_checkpoint, report=ray.tune.report, rank=0)
    else:
        _launch_torch_trainer(config, plan, trial_id)


def _launch_torch_trainer(config: dict[str, Any], plan: TrialPlan, trial_id: str) -> None:
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"config": config, "plan": plan, "trial_id": trial_id},
        scaling_config=ray.train.ScalingConfig(
            num_workers=plan.workers, use_gpu=plan.gpus_per_worker > 0,
            resources_per_worker={"CPU": plan.cpus_per_worker, "GPU": plan.gpus_per_worker}),
        # Same name on a retry: Train V2 then resumes the run from its latest checkpoint.
        run_config=ray.train.RunConfig(name=f"train-{trial_id}", storage_path=plan.storage,
                                       callbacks=[TuneReportCallback()]),  # type: ignore[list-item]
    )
    fit_to_end_or_failure(trainer, plan, trial_id)


def fit_to_end_or_failure(trainer: Any, plan: TrialPlan, trial_id: str) -> None:
    """Runs a multi-worker trial; one that failed for good (its reason recorded) ends instead of being retried."""
    try:
        trainer.fit()
    except ray.train.TrainingFailedError:
        if plan.failure_of(trial_id) is None:  # a crash: Tune may retry the trial
            raise


def _worker_loop(loop_config: dict[str, Any]) -> None:
    rank = ray.train.get_context().get_world_rank()
    _train(loop_config["config"], loop_config["plan"], loop_config["trial_id"],
           get_checkpoint=ray.train.get_checkpoint, report=ray.train.report, rank=rank)


def _train(config: dict[str, Any], plan: TrialPlan, trial_id: str, *,
           get_checkpoint: Callable[[], Checkpoint | None], report: Callable[..., None], rank: int) -> None:
    space = plan.parsed_space
    work_dir = plan.work_dir(trial_id, rank)
    dataset = open_dataset(Path(plan.data_root), space.data.train, space.data.val, space.data.images)
    spec = TrialSpec(base=plan.base, dataset=dataset, point=plan.point(config), work_dir=work_dir,
                     pretrained=plan.pretrained, overrides=space.overrides, seed=space.search.seed,
                     dataloader_workers=plan.dataloader_workers, workers=plan.workers,
                     device=assigned_device(plan, cuda_visible=torch.cuda.is_available()))
    resume_from = _restore(get_checkpoint(), work_dir)

    def report_epoch(row: dict[str, float], checkpoint: Path) -> None:
        metrics = with_rung_score(row, space)
        if rank != 0:  # every worker reports (Train's barrier); rank 0 alone uploads the checkpoint
            report(metrics)
            return
        with _checkpoint_dir(checkpoint, work_dir / TRIAL_CONFIG) as directory:
            report(metrics, checkpoint=Checkpoint.from_directory(directory))

    try:
        run_trial(spec, report=report_epoch, resume_from=resume_from)
    except UNRECOVERABLE as exc:
        plan.record_failure(trial_id, exc)
        if plan.workers > 1:
            # The other ranks may wait in a collective for this one (an OOM is not agreed like a NaN loss):
            # failing the worker makes Ray Train stop the whole group within seconds.
            raise
    except TrialSetupFailed as exc:  # a retry would fail the same way: end the trial now, as failed
        if rank == 0:
            plan.record_setup_failure(trial_id, str(exc))
    finally:
        for stale in work_dir.rglob("*.pth"):  # reported copies live in Ray storage
            stale.unlink()


def assigned_device(plan: TrialPlan, *, cuda_visible: bool) -> str:
    """The device Ray gave this worker: its GPU when the trial asked for GPUs, else the CPU.

    Ray sets ``CUDA_VISIBLE_DEVICES`` to the GPUs it assigned (a GPU shared by fractional trials included), so
    a one-worker trial's GPU is ``cuda:0``; Ray Train shows each worker all GPUs on its node and names its own.

    Raises:
        RuntimeError: when what this process sees contradicts what Ray assigned: training would silently run
            on the CPU, or on a GPU another trial holds.
    """
    if plan.gpus_per_worker == 0:
        if cuda_visible:
            raise RuntimeError(f"this CPU trial sees CUDA devices (CUDA_VISIBLE_DEVICES="
                               f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}): Ray hides GPUs from tasks without any "
                               f"only when its workers run with {HIDE_UNASSIGNED_GPUS}=1; export it before `ray start`")
        return "cpu"
    if not cuda_visible:
        raise RuntimeError(f"Ray gave this worker {plan.gpus_per_worker:g} GPU, but torch {torch.__version__} "
                           "cannot use CUDA: install the CUDA build of torch (scripts/install.sh --gpu)")
    return str(ray.train.torch.get_device()) if plan.workers > 1 else "cuda:0"


def _read(path: Path) -> str | None:
    return path.read_text().strip() if path.is_file() else None


def _restore(checkpoint: Checkpoint | None, work_dir: Path) -> Path | None:
    """Copies the trial's last reported checkpoint (from Ray storage, maybe another node) into work_dir."""
    if checkpoint is None:
        return None
    target = work_dir / "restored" / CHECKPOINT_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    with checkpoint.as_directory() as directory:
        shutil.copy(Path(directory) / CHECKPOINT_FILE, target)
    return target


@contextmanager
def _checkpoint_dir(checkpoint: Path, config: Path) -> Iterator[str]:
    """A directory holding the epoch's weights and the exact config, ready to hand to Ray storage."""
    # Beside the checkpoint, so the weights are hard-linked rather than copied.
    with tempfile.TemporaryDirectory(prefix="report-", dir=checkpoint.parent) as directory:
        (Path(directory) / CHECKPOINT_FILE).hardlink_to(checkpoint)
        shutil.copy(config, Path(directory) / TRIAL_CONFIG)
        yield directory
