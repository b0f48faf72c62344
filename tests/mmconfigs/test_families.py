"""Knobs on DETR-style and RTMDet bases: the config each builds (no training; the zoo test trains them)."""

from __future__ import annotations

from typing import Any

import pytest

from cocodata.dataset import Dataset
from mmconfigs.build import build_config

DETR = "mmdet::detr/detr_r50_8xb2-150e_coco.py"
DINO = "mmdet::dino/dino-4scale_r50_8xb2-12e_coco.py"
RTMDET = "mmdet::rtmdet/rtmdet_tiny_8xb32-300e_coco.py"
R18_CHANNELS = [64, 128, 256, 512]  # ResNet-18's four stages, at strides 4, 8, 16, 32


def _by_type(steps: list[Any], kind: str) -> Any:
    return next(step for step in steps if step["type"] == kind)


@pytest.mark.parametrize(("base", "indices"), [(DETR, (3,)), (DINO, (1, 2, 3)), (RTMDET, (1, 2, 3))],
                         ids=["detr-stride-32", "dino-strides-8-32", "rtmdet-strides-8-32"])
def test_a_new_backbone_feeds_the_neck_the_strides_the_base_did(synth: Dataset, base: str,
                                                                indices: tuple[int, ...]) -> None:
    cfg = build_config(base, {"backbone": "r18"}, synth)
    assert tuple(cfg.model.backbone.out_indices) == indices
    assert list(cfg.model.neck.in_channels) == [R18_CHANNELS[i] for i in indices]


def test_rtmdet_scale_keeps_every_size_relative_to_the_test_scale(synth: Dataset) -> None:
    cfg = build_config(RTMDET, {"scale": [320, 320]}, synth)  # half of the base's 640
    train = cfg.train_dataloader.dataset.pipeline
    assert tuple(_by_type(train, "CachedMosaic")["img_scale"]) == (320, 320)
    assert tuple(_by_type(train, "RandomResize")["scale"]) == (640, 640)  # twice the scale, as 1280 is to 640
    assert tuple(_by_type(train, "RandomCrop")["crop_size"]) == (320, 320)
    assert tuple(_by_type(train, "Pad")["size"]) == (320, 320)
    assert tuple(_by_type(train, "CachedMixUp")["img_scale"]) == (320, 320)
    switch = _by_type(cfg.custom_hooks, "PipelineSwitchHook")["switch_pipeline"]
    assert tuple(_by_type(switch, "RandomResize")["scale"]) == (320, 320)  # stage 2 resizes around the scale
    assert tuple(_by_type(switch, "Pad")["size"]) == (320, 320)
    assert tuple(_by_type(cfg.test_dataloader.dataset.pipeline, "Resize")["scale"]) == (320, 320)


def test_rtmdet_switches_its_pipeline_at_the_same_share_of_the_epochs(synth: Dataset) -> None:
    cfg = build_config(RTMDET, {"epochs": 12}, synth)
    assert _by_type(cfg.custom_hooks, "PipelineSwitchHook")["switch_epoch"] == round(280 / 300 * 12)
    assert _by_type(cfg.custom_hooks, "EMAHook")["momentum"] == 0.0002  # iteration-based: unchanged


def test_an_optimizer_change_keeps_the_bases_clipping_and_paramwise_settings(synth: Dataset) -> None:
    cfg = build_config(DINO, {"optimizer": "adamw", "lr": 2.0e-4}, synth)
    wrapper = cfg.optim_wrapper
    assert wrapper.optimizer.lr == 2.0e-4
    assert wrapper.clip_grad == {"max_norm": 0.1, "norm_type": 2}
    assert wrapper.paramwise_cfg.custom_keys["backbone"] == {"lr_mult": 0.1}
    assert wrapper.paramwise_cfg.custom_keys["norm"] == {"decay_mult": 0.0}  # adamw's own keys are added
    sgd = build_config(RTMDET, {"optimizer": "sgd"}, synth).optim_wrapper
    assert sgd.paramwise_cfg.norm_decay_mult == 0 and sgd.paramwise_cfg.bias_decay_mult == 0
