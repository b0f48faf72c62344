"""The freeze knob, proven by a real training step: frozen backbone parameters stay, the others move.

Freeze depth means the same for every family: -1 trains everything, 0 holds the stem, k holds the stem and
stages 1..k. Which parameters make up the stem and each stage is written out here per family, from the
architectures' module names, independently of how dettune expresses the depth to each backbone.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import FASTER_BASE, tiny_point
from mmdet.registry import MODELS
from mmdet.utils import register_all_modules
from mmengine.optim import build_optim_wrapper
from mmengine.runner import Runner

from cocodata.dataset import Dataset
from mmconfigs.build import build_config

pytestmark = pytest.mark.filterwarnings("ignore:backbone .*training from scratch:UserWarning")

# family of the backbone -> (stem prefixes, prefixes of stage k for k = 1..4)
PARTS = {
    "r18": (["conv1.", "bn1."], lambda k: [f"layer{k}."]),
    # a Swin stage ends in the patch merging that leads to the next one; norm{k-1} normalises its output
    "swin-t": (["patch_embed."], lambda k: [f"stages.{k - 1}.", f"norm{k - 1}."]),
    # a ConvNeXt stage starts with the downsampling that leads into it; downsample_layers.0 is the stem
    "convnext-t": (["downsample_layers.0."], lambda k: [f"stages.{k - 1}.", f"downsample_layers.{k - 1}."]),
}

# backbone, freeze depth, optimizer
CASES = [
    ("r18", -1, "sgd"), ("r18", 0, "sgd"), ("r18", 2, "sgd"), ("r18", 4, "adamw"),
    ("swin-t", 0, "adamw"), ("swin-t", 1, "sgd"), ("swin-t", 3, "adamw"),
    ("convnext-t", -1, "sgd"), ("convnext-t", 0, "sgd"), ("convnext-t", 0, "adamw"), ("convnext-t", 2, "sgd"),
]


@pytest.fixture(scope="module", autouse=True)
def _mmdet_registry() -> None:
    register_all_modules()


def _frozen(name: str, depth: int, parameter: str) -> bool:
    """Whether ``parameter`` (a backbone parameter name) belongs to what freeze ``depth`` holds still."""
    stem, stage = PARTS[name]
    prefixes = (stem if depth >= 0 else []) + [p for k in range(1, depth + 1) for p in stage(k)]
    return parameter.startswith(tuple(prefixes))


def _one_step(cfg: Any) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.nn.Module]:
    """Parameters and buffers before one real training step, and the model after it."""
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    model.train()  # as the Runner does: mmdet's backbones apply frozen_stages in train()
    optim_wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    batch = next(iter(Runner.build_dataloader(cfg.train_dataloader)))
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.train_step(batch, optim_wrapper)
    return before, model.state_dict(), model


@pytest.mark.parametrize(("name", "depth", "optimizer"), CASES)
def test_a_training_step_moves_exactly_the_unfrozen_parameters(synth: Dataset, name: str, depth: int,
                                                               optimizer: str) -> None:
    point = tiny_point(backbone=name, freeze=depth, optimizer=optimizer, lr=0.01, scale=[64, 64], batch_size=2)
    # Stochastic depth can skip a whole block for the batch, leaving its weights still though trainable.
    overrides = {"model.backbone.drop_path_rate": 0.0} if name != "r18" else None
    cfg = build_config(FASTER_BASE, point, synth, overrides=overrides)
    cfg.train_dataloader.update(num_workers=0, persistent_workers=False)
    before, after, model = _one_step(cfg)

    moved = {k for k in before if not torch.equal(before[k], after[k])}
    parameters = [k for k, _ in model.named_parameters() if k.startswith("backbone.")]
    frozen = [k for k in parameters if _frozen(name, depth, k.removeprefix("backbone."))]
    assert (len(frozen) > 0) == (depth >= 0)
    assert not moved & set(frozen), sorted(moved & set(frozen))[:5]
    assert set(parameters) - set(frozen) <= moved, sorted(set(parameters) - set(frozen) - moved)[:5]
    assert any(k.startswith("roi_head.") for k in moved)
    # Frozen BatchNorm layers stay in eval mode, so their running statistics don't move either.
    frozen_stats = [k for k in before if "running_" in k and _frozen(name, depth, k.removeprefix("backbone."))]
    assert not moved & set(frozen_stats)
