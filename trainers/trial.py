"""One MMDetection trial: build the config for a sampled point, train it with a real mmengine Runner,
report every validation epoch, checkpoint every epoch and resume from a checkpoint."""

from __future__ import annotations

import contextlib
import pickle
import re
import traceback
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from mmengine.config import Config
from mmengine.hooks import Hook

from cocodata.dataset import Dataset
from mmconfigs.build import build_config, single_scale_training
from spaces.errors import UserError, one_line
from trainers.checkpoint import TRIAL_CONFIG
from trainers.coco_metric import full_precision
from trainers.hook import EpochReportHook, Report, TrialDiverged
from trainers.metrics import no_detection_scores
from trainers.runner import build_runner, release_globals

TRIAL_LOG = "trial.log"
KEPT_LOCAL_CHECKPOINTS = 2
"""mmengine keeps this many epoch checkpoints in the work dir (the reported ones are copied to Ray storage)."""
# Raised before the first training step, these come from the config, a file, an import or a tensor shape, so
# a retry would raise them again. Lost connections and other OSErrors are left for Ray to retry, distributed
# errors too; a diverged loss and running out of memory have their own reasons.
_SETUP_ERRORS: tuple[type[BaseException], ...] = (
    UserError, FileNotFoundError, ImportError, KeyError, TypeError, ValueError, AttributeError, IndexError,
    AssertionError, NotImplementedError, RuntimeError, pickle.UnpicklingError)
_OTHER_ERRORS: tuple[type[BaseException], ...] = (dist.DistError, TrialDiverged, torch.OutOfMemoryError)


class TrialSetupFailed(RuntimeError):
    """The trial failed before its first training iteration completed, for a reason a retry cannot change.

    The message is one line (exception type and first line of its message); ``trial.log`` holds the traceback.
    """


class TrialDataError(RuntimeError):
    """Reading a sample failed (an image that does not load, an annotation the pipeline can't take): a retry
    would read the same file. The message names the file where it is known."""


WORKER_ERROR = "in DataLoader worker process"
"""How torch re-raises an error of a DataLoader worker: the sample's traceback is only text in its message."""


@dataclass(frozen=True, kw_only=True)
class TrialSpec:
    """Everything that defines one trial; the same spec always trains the same model."""

    base: str
    dataset: Dataset
    point: Mapping[str, Any]
    work_dir: Path
    pretrained: Mapping[str, str] = field(default_factory=dict)
    overrides: Mapping[str, Any] = field(default_factory=dict)
    seed: int = 0
    dataloader_workers: int = 0
    workers: int = 1  # data-parallel training processes the epoch is split across
    device: str = "cpu"  # "cuda:N" for the GPU this process was given


def trial_config(spec: TrialSpec, *, experiment_name: str, resume_from: Path | None = None) -> Config:
    """The full config the Runner gets: the knobs' config plus this trial's runtime settings."""
    cfg = build_config(spec.base, spec.point, spec.dataset, pretrained=spec.pretrained,
                       overrides=spec.overrides, workers=spec.workers)
    set_runtime(cfg, work_dir=spec.work_dir, experiment_name=experiment_name, seed=spec.seed,
                dataloader_workers=spec.dataloader_workers, device=spec.device, resume_from=resume_from)
    return cfg


def set_runtime(cfg: Config, *, work_dir: Path, experiment_name: str, seed: int, dataloader_workers: int = 0,
                device: str = "cpu", resume_from: Path | None = None) -> None:
    """Gives a knobs' config the runtime settings of a trial: where it writes, its seed, device and loaders.

    Every Runner dettune builds gets them here: a trial's and validate's first step (:mod:`trainers.smoke`).
    """
    distributed = dist.is_available() and dist.is_initialized()
    cuda = device.startswith("cuda")
    cfg.work_dir = str(work_dir)
    cfg.experiment_name = experiment_name
    # Ray Train has already built the process group: 'pytorch' makes mmengine use it (and wrap DDP).
    cfg.launcher = "pytorch" if distributed else "none"
    # No dist_cfg: mmengine only reads it to build a process group, and Ray Train has built it.
    # cuDNN's autotuner re-tunes for every new input shape: worth it on a GPU only when training shapes repeat.
    cfg.env_cfg = dict(cudnn_benchmark=cuda and single_scale_training(cfg),
                       mp_cfg=dict(mp_start_method="fork", opencv_num_threads=0))
    if distributed:
        # mmengine's default wrapper passes device_ids=[LOCAL_RANK]: torch refuses any for CPU modules, and under
        # Ray Train the local rank need not index the GPU this worker was given.
        device_ids = [torch.device(device).index] if cuda else None
        cfg.model_wrapper_cfg = dict(type="MMDistributedDataParallel", broadcast_buffers=False, device_ids=device_ids)
    cfg.randomness = dict(seed=seed)
    full_precision(cfg.get("val_evaluator"))  # the trial's scores unrounded: ASHA and TPE rank them
    cfg.default_hooks.checkpoint = dict(type="CheckpointHook", interval=1, by_epoch=True,
                                        max_keep_ckpts=KEPT_LOCAL_CHECKPOINTS)
    cfg.default_hooks.logger = dict(type="LoggerHook", interval=10)
    # One visualizer per trial, writing only locally: MLflow hears each metric once, from the search.
    cfg.visualizer = dict(type="DetLocalVisualizer", vis_backends=[dict(type="LocalVisBackend")],
                          name=experiment_name)
    for key in ("train_dataloader", "val_dataloader", "test_dataloader"):
        if cfg.get(key) is not None:
            cfg[key].num_workers = dataloader_workers
            cfg[key].persistent_workers = dataloader_workers > 0
    cfg.resume = resume_from is not None
    cfg.load_from = str(resume_from) if resume_from is not None else None


def run_trial(spec: TrialSpec, *, report: Report | None = None, resume_from: Path | None = None
              ) -> list[dict[str, float]]:
    """Trains the trial to its last epoch and returns each epoch's metrics, in order.

    Args:
        spec: what to train.
        report: called after every validation epoch with that epoch's metrics and checkpoint path.
        resume_from: a checkpoint this trial saved earlier; training continues after its epoch with the
            weights, optimizer and scheduler state it holds.

    The Runner's logs, and anything else printed during the trial, go to ``work_dir/trial.log``.
    """
    spec.work_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, float]] = []

    def collect(row: dict[str, float], checkpoint: Path) -> None:
        rows.append(row)
        if report is not None:
            report(row, checkpoint)

    name = f"dettune-{uuid.uuid4().hex[:12]}"
    first_step = _FirstIteration()
    with _trial_log(spec.work_dir / TRIAL_LOG):
        try:
            cfg = trial_config(spec, experiment_name=name, resume_from=resume_from)
            cfg.dump(str(spec.work_dir / TRIAL_CONFIG))
            _bind_gpu(spec.device)
            runner = build_runner(cfg)
            empty_scores = no_detection_scores(spec.dataset.val_area_ranges)
            runner.register_hook(first_step, priority="VERY_HIGH")
            runner.register_hook(EpochReportHook(collect, empty_scores=empty_scores), priority="LOWEST")
            runner.train()
        except Exception as error:
            traceback.print_exc()  # into trial.log: the console only names the file
            reading = sample_read_error(error, spec.dataset.root)
            if reading is not None:
                raise TrialDataError(reading) from error
            if resume_from is None and not first_step.done and is_setup_error(error):
                raise TrialSetupFailed(one_line(error)) from error
            raise
        finally:
            release_globals(name)
    return rows


class _FirstIteration(Hook):
    """Notes that a training iteration completed: a failure after that is not a setup failure."""

    done = False

    def after_train_iter(self, runner: Any, batch_idx: int, data_batch: Any = None, outputs: Any = None) -> None:
        self.done = True


def sample_read_error(error: BaseException, data_root: Path) -> str | None:
    """``"<file>: <error>"`` when ``error`` was raised reading a sample, here or in a DataLoader worker; else None.

    In this process the innermost dataset ``__getitem__`` on the traceback knows its index, so its file; from a
    worker only the message is left, and the file is the first path under the dataset's root it names.
    """
    frames = [frame for frame, _ in traceback.walk_tb(error.__traceback__)
              if frame.f_code.co_name == "__getitem__"
              and isinstance(frame.f_locals.get("self"), torch.utils.data.Dataset)]
    text = str(error)
    if not frames and WORKER_ERROR not in text:
        return None
    last = [line.strip() for line in text.splitlines() if line.strip()]
    reason = f"{type(error).__name__}: {last[-1] if last else 'no message'}"
    return f"{_sample_file(frames[-1].f_locals) if frames else _path_in(text, data_root)}: {reason}"


def _sample_file(local: Mapping[str, Any]) -> str:
    dataset, index = local["self"], local.get("idx", local.get("index"))
    try:
        return str(dataset.get_data_info(index)["img_path"])
    except Exception:  # a dataset without mmengine's data infos: the index still tells the user where
        return f"sample {index} of {type(dataset).__name__}"


def _path_in(text: str, data_root: Path) -> str:
    found = re.search(re.escape(str(data_root)) + r"[^\s'\",:]*", text)
    return found.group(0) if found else f"a sample under {data_root}"


def is_setup_error(error: BaseException) -> bool:
    """Whether ``error``, raised before training started, would be raised again by a retry."""
    return isinstance(error, _SETUP_ERRORS) and not isinstance(error, _OTHER_ERRORS)


@contextlib.contextmanager
def _trial_log(path: Path) -> Any:
    with open(path, "a", buffering=1) as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        yield


def _bind_gpu(device: str) -> None:
    """mmengine trains on the current CUDA device (and skips ``set_device`` when the process group exists)."""
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
