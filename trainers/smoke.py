"""validate's training step: a trial's first step, on a handful of images.

:func:`first_step` builds the Runner a trial builds (:func:`~trainers.trial.set_runtime`,
:func:`~trainers.runner.build_runner`) from a :func:`mmconfigs.smoke.smoke_config`, so the config's hooks, dataset
wrappers, collate function and batch augments all take part, and runs one training iteration and one validation
pass on the CPU, seeded, quietly, in a temporary work dir; then pulls a sample through every pipeline a hook
switches to later in training. A failure the config or the data causes is a :class:`~mmconfigs.smoke.SmokeError`
naming the stage and the config key it reads; a failure raised in dettune's own code is a bug and stays itself.
"""

from __future__ import annotations

import contextlib
import io
import multiprocessing
import pprint
import random
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from mmengine.config import Config
from mmengine.dataset import Compose
from mmengine.hooks import Hook

from mmconfigs.smoke import SMOKE_SEED, SmokeError, switched_pipelines
from spaces.errors import UserError, raised_by_dettune
from trainers.runner import build_runner, release_globals
from trainers.trial import is_setup_error, set_runtime


def first_step(cfg: Config) -> None:
    """Trains ``cfg`` (a :func:`~mmconfigs.smoke.smoke_config`) one iteration and validates it once, as a trial would.

    Raises:
        SmokeError: the config or the data fails at a stage; any other failure is raised as it is.
    """
    name = f"dettune-smoke-{uuid.uuid4().hex[:12]}"
    progress = _Progress()
    with tempfile.TemporaryDirectory(prefix="dettune-smoke-") as work_dir, _quiet(), _process_state_kept():
        set_runtime(cfg, work_dir=Path(work_dir), experiment_name=name, seed=SMOKE_SEED)
        cfg.default_hooks.checkpoint = None  # one iteration: nothing to resume
        cfg.train_cfg.max_epochs = 1  # of one iteration: smoke_config leaves one batch of images
        try:
            runner = build_runner(_UnformattedConfig(cfg.to_dict()))
            runner.register_hook(progress, priority="VERY_HIGH")
            progress.reached("train dataset", "train_dataloader.dataset")
            runner.train_loop  # noqa: B018 (the property builds the loop, its dataloader and dataset)
            progress.reached("val dataset", "val_dataloader.dataset, val_evaluator")
            runner.val_loop  # noqa: B018
            progress.reached("optimizer", "optim_wrapper, param_scheduler")
            runner.train()
            for pipeline in switched_pipelines(cfg):
                progress.reached("train pipeline", "custom_hooks.switch_pipeline")
                dataset = runner.train_dataloader.dataset
                dataset.pipeline = Compose(pipeline)  # as mmdet's PipelineSwitchHook switches it
                dataset[0]  # noqa: B018
        except Exception as error:
            if isinstance(error, UserError) or (is_setup_error(error) and not raised_by_dettune(error)):
                raise SmokeError(progress.stage, progress.key, error) from error
            raise
        finally:
            release_globals(name)


class _UnformattedConfig(Config):
    """A config printed without yapf: a Runner formats its config four times (log, dump, run info, visualizer),
    each as long as the training step of a small model, for files nobody reads."""

    @property
    def pretty_text(self) -> str:
        return pprint.pformat(self.to_dict())


class _Progress(Hook):
    """Where the run is, so a failure names the stage and the config key behind it."""

    def __init__(self) -> None:
        self.stage, self.key = "model", "model"

    def reached(self, stage: str, key: str) -> None:
        self.stage, self.key = stage, key

    def before_run(self, runner: Any) -> None:
        self.reached("hooks", "custom_hooks, model.init_cfg")

    def before_train_epoch(self, runner: Any) -> None:
        self.reached("train pipeline", "train_dataloader.dataset.pipeline")

    def before_train_iter(self, runner: Any, batch_idx: int, data_batch: Any = None) -> None:
        self.reached("forward + loss", "model")

    def before_val_epoch(self, runner: Any) -> None:
        self.reached("val pipeline", "val_dataloader.dataset.pipeline")

    def before_val_iter(self, runner: Any, batch_idx: int, data_batch: Any = None) -> None:
        self.reached("prediction", "model.test_cfg")

    def after_val_iter(self, runner: Any, batch_idx: int, data_batch: Any = None, outputs: Any = None) -> None:
        self.reached("evaluation", "val_evaluator")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The Runner logs its environment, config and hooks; validate prints one summary."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


@contextlib.contextmanager
def _process_state_kept() -> Iterator[None]:
    """Restores what a Runner sets for the whole process: the random states it seeds, multiprocessing's start
    method and OpenCV's threads (validate runs in the search's driver, which trains nothing)."""
    py_state, np_state = random.getstate(), np.random.get_state()
    start_method, cv_threads = multiprocessing.get_start_method(allow_none=True), cv2.getNumThreads()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
            multiprocessing.set_start_method(start_method, force=True)
            cv2.setNumThreads(cv_threads)
