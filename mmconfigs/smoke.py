"""Proves that a trial config can train before a search spends its budget on it.

Building a model is not enough: a pipeline may read files the dataset does not have (semantic maps), keys
its annotations lack, or hand the model shapes it does not expect; a head may need what a hook sets (TOOD's
epoch), a dataset wrapper or a batch augment may shape the batch (YOLOX). So each distinct (model, pipeline)
combination runs a trial's first step once: :class:`SmokeTrainer` hands :func:`smoke_config` (the trial's config
on a handful of images, at a small image scale, no checkpoint read) to a :data:`FirstStep`, which trains it one
iteration and validates it once with a real Runner (``trainers.smoke.first_step``: ``mmconfigs`` imports nothing of
``trainers``, so the caller passes it in). Images are resized to at most :data:`SMOKE_SIDE` pixels first (DETRs:
:data:`SMOKE_SIDE_DETR`), never below the smallest input the model's features take, so a large model costs
seconds: the point is files, keys and shapes, not speed.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from mmengine.config import Config
from torch.overrides import TorchFunctionMode

from mmconfigs.families import is_detr_family
from mmconfigs.tree import dicts, drop_init_cfgs
from spaces.errors import one_line

SMOKE_SIDE = 256
"""The longest image side of the smoke run; larger test scales are scaled down to it."""
SMOKE_SIDE_DETR = 512
"""The same for DETR-style detectors: DINO selects its 900 queries among the encoder's tokens, and a random
crop of a 256 px image leaves fewer than that, a failure the real scale never has."""
TRAIN_BATCH = 2
"""Train images of the smoke run (fewer if the trial's batch is smaller): one iteration of one batch."""
VAL_IMAGES = 1
SMOKE_SEED = 0


class SmokeError(Exception):
    """One stage of the smoke run failed for a reason of the config or the data (a bug is raised as itself).

    Attributes:
        stage: What was being done, e.g. ``"train pipeline"``.
        key: The config key that stage reads, e.g. ``"train_dataloader.dataset.pipeline"``.
        error: The original exception.
    """

    def __init__(self, stage: str, key: str, error: BaseException) -> None:
        self.stage, self.key, self.error = stage, key, error
        super().__init__(f"{stage} ({key}): {one_line(error)}")


FirstStep = Callable[[Config], None]
"""Trains a :func:`smoke_config` one iteration and validates it once; raises :class:`SmokeError`."""


class SmokeTrainer:
    """Runs the first step of each distinct (model, pipeline) combination of a space once.

    Args:
        first_step: What runs it (``trainers.smoke.first_step``).
    """

    def __init__(self, first_step: FirstStep) -> None:
        self._first_step = first_step
        self._outcomes: dict[str, SmokeError | None] = {}
        self.seconds = 0.0

    @property
    def runs(self) -> int:
        return len(self._outcomes)

    def run(self, cfg: Config, *, min_side: int | None = None) -> SmokeError | None:
        """Runs the first step of ``cfg`` unless a config that differs only in what cannot change files, keys
        or shapes ran already; returns its failure, or None.

        Args:
            cfg: The trial's config.
            min_side: The smallest image side the model's features take, when the smoke scale is below it.
        """
        cfg = smoke_config(cfg, min_side)
        key = _key(cfg)
        if key not in self._outcomes:
            started = time.perf_counter()
            try:
                self._first_step(cfg)
                self._outcomes[key] = None
            except SmokeError as error:
                self._outcomes[key] = error
            finally:
                self.seconds += time.perf_counter() - started
        return self._outcomes[key]


def smoke_config(cfg: Config, min_side: int | None = None) -> Config:
    """A copy of ``cfg`` that trains on :data:`TRAIN_BATCH` images and validates on :data:`VAL_IMAGES`, at
    :func:`smoke_scale`, with no checkpoint read (weights start as a trial's do without ``pretrained``)."""
    from mmconfigs.build import rescale

    cfg = copy.deepcopy(cfg)
    scale = smoke_scale(cfg, min_side)
    if scale is not None:
        rescale(cfg, scale)
    drop_init_cfgs(cfg.model, lambda init: init.get("type") == "Pretrained")
    train = cfg.train_dataloader
    train.batch_size = min(int(train.batch_size), TRAIN_BATCH)
    _restrict(train.dataset, train.batch_size)
    cfg.val_dataloader.batch_size = VAL_IMAGES
    _restrict(cfg.val_dataloader.dataset, VAL_IMAGES)
    return cfg


def smoke_scale(cfg: Config, min_side: int | None = None) -> tuple[int, int] | None:
    """The test scale the smoke run resizes to: at most :data:`SMOKE_SIDE` (DETRs: :data:`SMOKE_SIDE_DETR`)
    on the longest side, at least ``min_side`` on the shortest; None to keep the trial's."""
    from mmconfigs.build import test_scale

    scale = test_scale(cfg)
    if scale is None:
        return None
    side = SMOKE_SIDE_DETR if is_detr_family(cfg.model) else SMOKE_SIDE
    factor = min(1.0, side / max(scale))
    if min_side is not None:
        factor = max(factor, min(1.0, min_side / min(scale)))
    if factor >= 1.0:
        return None
    return max(32, math.ceil(scale[0] * factor)), max(32, math.ceil(scale[1] * factor))


def _restrict(node: Any, images: int) -> None:
    """The first ``images`` images of a dataset (mmengine's ``indices``), each once: a ``RepeatDataset`` wrapper
    repeats it once; other wrappers (YOLOX's ``MultiImageMixDataset``) mix within those images."""
    while "dataset" in node:
        if "times" in node:
            node["times"] = 1
        node = node.dataset
    node["indices"] = images


_NOT_SHAPES = ("frozen_stages", "norm_eval", "init_cfg")
"""Model settings that decide which weights train and how they start, not files, keys or shapes."""


def _key(cfg: Config) -> str:
    """What decides a smoke run: the model (less :data:`_NOT_SHAPES`), its imports, both datasets, the batch,
    the pipelines a hook switches to and the hooks themselves, at the smoke scale."""
    model = cfg.model.to_dict()
    for node in dicts(model):
        for name in _NOT_SHAPES:
            node.pop(name, None)
    loaders = [cfg.get(key, {}).get("dataset") for key in ("train_dataloader", "val_dataloader")]
    parts = [model, cfg.get("custom_imports"), loaders, cfg.train_dataloader.batch_size, cfg.get("custom_hooks")]
    return json.dumps(parts, sort_keys=True, default=repr)


def switched_pipelines(cfg: Config) -> list[Any]:
    """Train pipelines a hook switches to during training (RTMDet's ``PipelineSwitchHook``)."""
    hooks = cfg.get("custom_hooks") or []
    return [hook.switch_pipeline for hook in hooks if hook.get("switch_pipeline") is not None]


# ---------------------------------------------------------------------------------------------------------
# The smallest input a model takes, from its feature maps' shapes on the meta device (no compute).


def features_fail(model: Any, side: int) -> Exception | None:
    """What extracting a ``side`` x ``side`` image's features raises in a model on the meta device, or None.

    Shapes only: a VGG's features at 512 px take milliseconds. A model with ops that have no meta kernel
    (some mmcv ops) fails at every side.
    """
    try:
        with meta_device(), torch.no_grad():
            model.eval().extract_feat(torch.empty(1, 3, side, side))
    except Exception as error:  # whatever a too-small map raises inside a backbone or neck
        return error
    return None


def smallest_side(model: Any, low: int, high: int) -> int:
    """The smallest side in ``(low, high]`` whose features compute, given that ``low`` fails and ``high`` does not
    (feature maps grow with the input, so one side splits the failing from the working ones)."""
    while high - low > 1:
        middle = (low + high) // 2
        if features_fail(model, middle) is None:
            high = middle
        else:
            low = middle
    return high


class _HostLinspace(TorchFunctionMode):
    """Keeps ``torch.linspace`` on the CPU: Swin and ConvNeXt read drop-path rates from it with ``.item()``."""

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = dict(kwargs or {})
        if func is torch.linspace and kwargs.get("device") is None:
            kwargs["device"] = "cpu"
        return func(*args, **kwargs)


@contextmanager
def meta_device() -> Iterator[None]:
    """Tensors made inside have shapes but no storage, so constructing even a large model is quick."""
    with torch.device("meta"), _HostLinspace():
        yield
