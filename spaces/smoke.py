"""Proves that a trial config can train before a search spends its budget on it.

Building a model is not enough: a pipeline may read files the dataset does not have (semantic maps), keys
its annotations lack, or hand the model shapes it does not expect. :class:`SmokeTrainer` builds a config's
train and val datasets, pulls samples through both pipelines and runs one forward + loss on a batch of two
train images and one prediction on a val image, on the CPU, with weights initialised as a trial's Runner
does (``init_weights``, but no checkpoint is read) and a fixed seed, so the same space gets the same verdict.
Images are resized to at most :data:`SMOKE_SIDE` pixels first (DETRs: :data:`SMOKE_SIDE_DETR`), so a large
model costs seconds: the point is files, keys and shapes, not speed.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import random
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from mmengine.config import Config
from mmengine.dataset import Compose, pseudo_collate
from mmengine.logging import MMLogger
from mmengine.registry import DefaultScope

from spaces.errors import one_line
from spaces.families import is_detr_family
from spaces.tree import dicts, drop_init_cfgs

SMOKE_SIDE = 256
"""The longest image side of the smoke run; larger test scales are scaled down to it."""
SMOKE_SIDE_DETR = 512
"""The same for DETR-style detectors: DINO selects its 900 queries among the encoder's tokens, and a random
crop of a 256 px image leaves fewer than that, a failure the real scale never has."""
TRAIN_BATCH = 2
SMOKE_SEED = 0


class SmokeError(Exception):
    """One stage of the smoke run failed.

    Attributes:
        stage: What was being done, e.g. ``"train pipeline"``.
        key: The config key that stage reads, e.g. ``"train_dataloader.dataset.pipeline"``.
        error: The original exception.
    """

    def __init__(self, stage: str, key: str, error: BaseException) -> None:
        self.stage, self.key, self.error = stage, key, error
        super().__init__(f"{stage} ({key}): {one_line(error)}")


class SmokeTrainer:
    """Runs smoke trainings of several configs of one space, sharing what they have in common.

    Datasets are built once per annotation file and dataset settings (reading a large COCO file is the
    slow part) and each config's pipeline is swapped in.
    """

    def __init__(self) -> None:
        self._datasets: dict[str, Any] = {}
        self._done: set[str] = set()
        self.seconds = 0.0

    @property
    def runs(self) -> int:
        return len(self._done)

    def run(self, cfg: Config) -> None:
        """Builds both datasets, pulls samples and runs forward + loss and one prediction, unless a config
        that differs only in what cannot change files, keys or shapes ran already.

        Raises:
            SmokeError: naming the stage and config key that failed.
        """
        cfg = _shrunk(cfg)
        key = _key(cfg)
        if key in self._done:
            return
        self._done.add(key)
        started = time.perf_counter()
        try:
            self._run(cfg)
        finally:
            self.seconds += time.perf_counter() - started

    def _run(self, cfg: Config) -> None:
        from mmdet.registry import MODELS

        with DefaultScope.overwrite_default_scope("mmdet"), _quiet(), _seeded(SMOKE_SEED):
            train = [self._sample(cfg, "train_dataloader", index) for index in range(TRAIN_BATCH)]
            for pipeline in _switched_pipelines(cfg):  # RTMDet's second stage: its samples must load too
                self._sample(cfg, "train_dataloader", 0, pipeline)
            val = [self._sample(cfg, "val_dataloader", 0)]
            with _stage("model", "model"):
                model = MODELS.build(_without_checkpoints(cfg.model))
                # Some parameters are allocated uninitialised (Deformable DETR's level_embed) and only
                # init_weights makes them finite, as the Runner does before a trial's first step.
                model.init_weights()
            with _stage("forward + loss", "model"):
                model.train()
                data = model.data_preprocessor(pseudo_collate(train), True)
                model.parse_losses(model(**data, mode="loss"))
            with _stage("prediction", "model.test_cfg"), torch.no_grad():
                model.eval()
                model.val_step(pseudo_collate(val))

    def _sample(self, cfg: Config, loader: str, index: int, switched: Any = None) -> Any:
        """Sample ``index`` of a dataloader's dataset, through its pipeline (or the one a hook switches to)."""
        node = _innermost(cfg[loader].dataset)
        settings = {k: v for k, v in node.items() if k != "pipeline"}
        key = json.dumps(settings, sort_keys=True, default=repr)
        with _stage(f"{loader.split('_')[0]} dataset", f"{loader}.dataset"):
            if key not in self._datasets:
                from mmdet.registry import DATASETS

                self._datasets[key] = DATASETS.build({**settings, "pipeline": []})
            dataset = self._datasets[key]
        where = f"{loader}.dataset.pipeline" if switched is None else "custom_hooks.switch_pipeline"
        with _stage(f"{loader.split('_')[0]} pipeline", where):
            dataset.pipeline = Compose(node.get("pipeline", []) if switched is None else switched)
            return dataset[index % len(dataset)]


_NOT_SHAPES = ("frozen_stages", "norm_eval", "init_cfg")
"""Model settings that decide which weights train and how they start, not files, keys or shapes."""


def _key(cfg: Config) -> str:
    """What decides a smoke run: the model (less :data:`_NOT_SHAPES`), its imports, both datasets and the
    pipelines a hook switches to, at the smoke scale."""
    model = cfg.model.to_dict()
    for node in dicts(model):
        for name in _NOT_SHAPES:
            node.pop(name, None)
    loaders = [cfg.get(key, {}).get("dataset") for key in ("train_dataloader", "val_dataloader")]
    parts = [model, cfg.get("custom_imports"), loaders, _switched_pipelines(cfg)]
    return json.dumps(parts, sort_keys=True, default=repr)


def _switched_pipelines(cfg: Config) -> list[Any]:
    """Train pipelines a hook switches to during training (RTMDet's ``PipelineSwitchHook``)."""
    hooks = cfg.get("custom_hooks") or []
    return [hook.switch_pipeline for hook in hooks if hook.get("switch_pipeline") is not None]


def _shrunk(cfg: Config) -> Config:
    """A copy of ``cfg`` whose images are at most :data:`SMOKE_SIDE` pixels on their longest side."""
    from spaces.build import rescale, test_scale

    cfg = copy.deepcopy(cfg)
    scale = test_scale(cfg)
    side = SMOKE_SIDE_DETR if is_detr_family(cfg.model) else SMOKE_SIDE
    if scale is not None and max(scale) > side:
        factor = side / max(scale)
        rescale(cfg, (max(32, round(scale[0] * factor)), max(32, round(scale[1] * factor))))
    return cfg


def _without_checkpoints(model: Any) -> Any:
    """A copy of a model config whose ``Pretrained`` inits are dropped: the smoke run reads no weights."""
    model = copy.deepcopy(model)
    drop_init_cfgs(model, lambda init: init.get("type") == "Pretrained")
    return model


def _innermost(node: Any) -> Any:
    while "dataset" in node:
        node = node.dataset
    return node


@contextlib.contextmanager
def _stage(name: str, key: str) -> Iterator[None]:
    try:
        yield
    except SmokeError:
        raise
    except Exception as error:  # whatever mmdet raises: the stage and key say where to look
        raise SmokeError(name, key, error) from error


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seeds torch, numpy and random (the pipelines' random crops and flips) and restores their states after."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """mmdet prints dataset and model notes, and init_weights logs every parameter through mmengine's
    logger, whose handlers hold the real stdout; validate prints one summary."""
    logger = MMLogger.get_current_instance()
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)
