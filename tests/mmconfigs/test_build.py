"""Each knob, value by value: the config fields it must set, checked on the config build_config returns.

Where a field only matters once mmdet reads it (channels, weights, scales, schedules), the test builds the
real thing from the config: the model, the dataset pipeline, the lr scheduler.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import traceback
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import CASCADE_BASE, FASTER_BASE, tiny_point
from mmdet.registry import DATASETS, MODELS
from mmdet.utils import register_all_modules
from mmengine.config import Config
from mmengine.dataset import pseudo_collate
from mmengine.registry import PARAM_SCHEDULERS

from cocodata.dataset import Dataset
from mmconfigs import build as build_module
from mmconfigs.backbones import backbone, catalog_name, import_mmpretrain_models
from mmconfigs.build import (
    STEPS,
    Build,
    BuildError,
    KnobError,
    build_config,
    load_base,
    resolve_base,
    single_scale_training,
    step,
    step_milestones,
)
from spaces.errors import UserError
from spaces.knobs import BACKBONES, KNOBS, ROI_HEADS

# Every build without a local checkpoint warns once; the tests that count warnings record them explicitly.
pytestmark = pytest.mark.filterwarnings("ignore:backbone .*training from scratch:UserWarning")

SWIN_MASK_RCNN = "mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py"


@pytest.fixture(scope="module", autouse=True)
def _mmdet_registry() -> None:
    register_all_modules()


@pytest.fixture(scope="module")
def faster() -> Config:
    """mmdet's Faster R-CNN 1x config, loaded once; build_config copies it."""
    return load_base(FASTER_BASE)


@pytest.fixture(scope="module")
def cascade() -> Config:
    return load_base(CASCADE_BASE)


def _nodes(node: Any) -> Iterator[Mapping[str, Any]]:
    """Every dict nested anywhere in a config, lists included."""
    if isinstance(node, Mapping):
        yield node
        for child in node.values():
            yield from _nodes(child)
    elif isinstance(node, (list, tuple)):
        for child in node:
            yield from _nodes(child)


def _of_type(node: Any, *types: str) -> list[Mapping[str, Any]]:
    """Every dict of one of ``types`` inside ``node`` (a Config or any part of one)."""
    root = node._cfg_dict if isinstance(node, Config) else node
    return [n for n in _nodes(root) if n.get("type") in types]


def _pairs(scales: Any) -> list[tuple[int, int]]:
    return [(int(s[0]), int(s[1])) for s in scales]


def _user_warnings(build: Any) -> tuple[Any, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = build()
    return result, [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


def _batch(cfg: Config, images: int = 2) -> dict[str, Any]:
    """A real training batch from the config's own train pipeline."""
    dataset = DATASETS.build(cfg.train_dataloader.dataset)
    return pseudo_collate([dataset[i] for i in range(images)])


def _eval(module: torch.nn.Module) -> torch.nn.Module:
    module.eval()  # mmdet's backbones override train() without returning the module
    return module


# --- roi_head ---------------------------------------------------------------------------------------

# head -> detector type, RoI head type, bbox stages, mask stages
HEADS = {
    "faster": ("FasterRCNN", "StandardRoIHead", 1, 0),
    "cascade": ("CascadeRCNN", "CascadeRoIHead", 3, 0),
    "htc": ("HybridTaskCascade", "HybridTaskCascadeRoIHead", 3, 3),
}


@pytest.mark.parametrize("base", [FASTER_BASE, CASCADE_BASE], ids=["faster-base", "cascade-base"])
@pytest.mark.parametrize("head", ROI_HEADS)
def test_roi_head_sets_detector_stages_and_classes(synth: Dataset, base: str, head: str) -> None:
    detector, roi_type, bbox_stages, mask_stages = HEADS[head]
    cfg = build_config(base, {"roi_head": head}, synth)
    roi = cfg.model.roi_head

    assert (cfg.model.type, roi.type) == (detector, roi_type)
    bbox_heads = roi.bbox_head if isinstance(roi.bbox_head, list) else [roi.bbox_head]
    assert len(bbox_heads) == bbox_stages
    rcnn_train = cfg.model.train_cfg.rcnn
    assert len(rcnn_train if isinstance(rcnn_train, list) else [rcnn_train]) == bbox_stages
    assert len(roi.get("mask_head") or []) == mask_stages
    counts = [n["num_classes"] for n in _nodes(roi) if "num_classes" in n]
    assert counts == [len(synth.classes)] * (bbox_stages + mask_stages) == [10] * (bbox_stages + mask_stages)
    assert {n.get("with_mask") for n in _of_type(cfg, "LoadAnnotations")} == {mask_stages > 0}
    assert cfg.model.data_preprocessor.get("pad_mask", False) == (mask_stages > 0)


def test_htc_without_masks_is_refused_with_the_reason(synth: Dataset) -> None:
    boxes_only = dataclasses.replace(synth, has_masks=False)
    with pytest.raises(BuildError, match=r"htc.*mask.*segmentation.*faster or cascade"):
        build_config(FASTER_BASE, {"roi_head": "htc"}, boxes_only)


def test_mask_base_config_without_masks_needs_a_box_head(synth: Dataset) -> None:
    boxes_only = dataclasses.replace(synth, has_masks=False)
    with pytest.raises(BuildError, match="mask head"):
        build_config(SWIN_MASK_RCNN, {}, boxes_only)

    cfg = build_config(SWIN_MASK_RCNN, {"roi_head": "faster"}, boxes_only)
    assert cfg.model.type == "FasterRCNN"
    # mmdet's loader fails on annotations without 'segmentation' when asked for masks.
    assert not any(n.get("with_mask") for n in _of_type(cfg, "LoadAnnotations"))
    assert DATASETS.build(cfg.train_dataloader.dataset)[0]["data_samples"].gt_instances.bboxes.shape[1] == 4


def test_dataset_reaches_every_loader_and_evaluator(synth: Dataset) -> None:
    cfg = build_config(FASTER_BASE, {}, synth)
    for key, ann in (("train_dataloader", synth.train), ("val_dataloader", synth.val),
                     ("test_dataloader", synth.val)):
        dataset = cfg[key].dataset
        assert (dataset.data_root, dataset.ann_file) == (str(synth.root), ann)
        assert dataset.metainfo.classes == list(synth.classes)
    assert cfg.val_evaluator.ann_file == cfg.test_evaluator.ann_file == str(synth.val_json)


# --- backbone ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("tiny", [True, False], ids=["tiny", "full"])
@pytest.mark.parametrize("name", BACKBONES)
def test_backbone_replaces_the_dict_and_sets_neck_channels(faster: Config, synth: Dataset, name: str,
                                                           tiny: bool) -> None:
    chosen = backbone(name, tiny=tiny)
    cfg = build_config(faster, {"backbone": name, "preset": "tiny" if tiny else "full"}, synth)

    assert cfg.model.backbone.to_dict() == chosen.cfg  # nothing of the base's ResNet-50 is left
    assert "init_cfg" not in cfg.model.backbone
    assert list(cfg.model.neck.in_channels) == chosen.out_channels
    if chosen.family != "resnet":
        assert not {"depth", "style", "norm_eval", "num_stages"} & set(cfg.model.backbone)


@pytest.mark.parametrize("name", BACKBONES)
def test_tiny_backbone_output_channels_feed_the_neck(synth: Dataset, name: str) -> None:
    cfg = build_config(FASTER_BASE, tiny_point(backbone=name), synth)
    body, neck = _eval(MODELS.build(cfg.model.backbone)), _eval(MODELS.build(cfg.model.neck))
    with torch.no_grad():
        features = body(torch.zeros(1, 3, 64, 64))
        pyramid = neck(features)

    assert [f.shape[1] for f in features] == list(cfg.model.neck.in_channels)
    assert [p.shape[1] for p in pyramid] == [cfg.model.neck.out_channels] * cfg.model.neck.num_outs


@pytest.mark.parametrize("name", BACKBONES)
def test_full_width_backbone_builds_and_feeds_the_neck(synth: Dataset, name: str) -> None:
    cfg = build_config(FASTER_BASE, {"backbone": name}, synth)
    # Swin and ConvNeXt call .item() while constructing, which the meta device refuses: they build on
    # the CPU (a few seconds for Swin-B), and a small input keeps their forward quick.
    device = "meta" if backbone(name).family == "resnet" else "cpu"
    with torch.device(device), torch.no_grad():
        body, neck = _eval(MODELS.build(cfg.model.backbone)), _eval(MODELS.build(cfg.model.neck))
        features = body(torch.zeros(1, 3, 64, 64))
        neck(features)

    assert [f.shape[1] for f in features] == list(cfg.model.neck.in_channels)


@pytest.fixture(scope="module")
def batches() -> dict[bool, dict[str, Any]]:
    """Real batches, with masks (True) and without, made once by the first contract case needing each."""
    return {}


@pytest.mark.parametrize("head", ROI_HEADS)
@pytest.mark.parametrize("name", BACKBONES)
def test_every_backbone_trains_with_every_head(synth: Dataset, batches: dict[bool, dict[str, Any]],
                                               name: str, head: str) -> None:
    cfg = build_config(FASTER_BASE, tiny_point(backbone=name, roi_head=head, scale=[64, 64]), synth)
    model = MODELS.build(cfg.model)
    model.train()
    masks = head == "htc"
    if masks not in batches:
        batches[masks] = _batch(cfg)
    data = model.data_preprocessor(batches[masks], True)
    losses = model(**data, mode="loss")

    assert any(k.endswith("loss_bbox") for k in losses)
    assert (head == "htc") == any("loss_mask" in k for k in losses)
    total, _ = model.parse_losses(losses)
    assert torch.isfinite(total)


# --- pretrained weights -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["r50", "swin-t", "convnext-t"])
def test_chosen_backbone_without_checkpoint_trains_from_scratch_with_one_warning(
        faster: Config, synth: Dataset, name: str) -> None:
    cfg, messages = _user_warnings(lambda: build_config(faster, {"backbone": name}, synth))

    assert len(messages) == 1, messages
    assert name in messages[0] and "from scratch" in messages[0] and "pretrained:" in messages[0]
    assert "init_cfg" not in cfg.model.backbone
    assert "://" not in cfg.pretty_text


def test_base_backbone_remote_weights_are_dropped_with_one_warning(faster: Config, synth: Dataset) -> None:
    cfg, messages = _user_warnings(lambda: build_config(faster, {}, synth))

    assert len(messages) == 1, messages
    assert "torchvision://resnet50" in messages[0] and "r50" in messages[0]
    assert cfg.model.backbone.init_cfg is None and cfg.model.backbone.depth == 50
    assert "://" not in cfg.pretty_text


def test_remote_weights_anywhere_are_dropped(faster: Config, synth: Dataset) -> None:
    base = copy.deepcopy(faster)  # not Config.copy: it shares the nested dicts with the module fixture
    base.load_from = "https://example.org/detector.pth"
    base.model.neck.init_cfg = dict(type="Pretrained", checkpoint="https://example.org/neck.pth")
    base.model.rpn_head.init_cfg = [dict(type="Normal", layer="Conv2d", std=0.01),
                                    dict(type="Pretrained", checkpoint="torchvision://rpn")]
    cfg, messages = _user_warnings(lambda: build_config(base, {"backbone": "r18"}, synth))

    assert cfg.load_from is None and cfg.model.neck.init_cfg is None
    assert cfg.model.rpn_head.init_cfg == [dict(type="Normal", layer="Conv2d", std=0.01)]
    assert len(messages) == 1 and "detector.pth" in messages[0] and "neck.pth" in messages[0]
    assert "://" not in cfg.pretty_text


def _checkpoint(tmp_path: Path, name: str) -> tuple[Path, dict[str, torch.Tensor]]:
    import_mmpretrain_models()  # ConvNeXt is built here before any build_config did it
    torch.manual_seed(7)
    state = MODELS.build(backbone(name, tiny=True).cfg).state_dict()
    path = tmp_path / f"{name}.pth"
    torch.save(state, path)
    return path, state


@pytest.mark.parametrize(("name", "loads"), [("r18", True), ("convnext-t", True), ("swin-t", False)])
def test_local_checkpoint_initialises_the_backbone(tmp_path: Path, synth: Dataset, name: str,
                                                   loads: bool) -> None:
    path, state = _checkpoint(tmp_path, name)
    cfg, messages = _user_warnings(
        lambda: build_config(FASTER_BASE, tiny_point(backbone=name), synth, pretrained={name: str(path)}))

    assert messages == []
    assert cfg.model.backbone.init_cfg == dict(type="Pretrained", checkpoint=str(path))
    assert cfg.model.backbone.get("norm_eval") is (True if name == "r18" else None)  # only ResNet has it
    body = MODELS.build(cfg.model.backbone)
    body.init_weights()
    if loads:  # Swin converts the official Swin repo's key names (convert_weights), so ours don't load
        assert all(torch.equal(body.state_dict()[k], v) for k, v in state.items())


def test_local_checkpoint_reaches_the_base_configs_own_backbone(tmp_path: Path, faster: Config,
                                                               synth: Dataset) -> None:
    weights = tmp_path / "r50.pth"
    weights.write_bytes(b"")
    cfg, messages = _user_warnings(lambda: build_config(faster, {}, synth, pretrained={"r50": str(weights)}))

    assert messages == []
    assert cfg.model.backbone.init_cfg == dict(type="Pretrained", checkpoint=str(weights))
    assert cfg.model.backbone.norm_eval is True


def test_missing_local_checkpoint_is_refused(synth: Dataset, tmp_path: Path) -> None:
    with pytest.raises(BuildError, match=r"pretrained checkpoint for r18 not found at .*nope\.pth"):
        build_config(FASTER_BASE, {"backbone": "r18"}, synth, pretrained={"r18": str(tmp_path / "nope.pth")})


@pytest.mark.parametrize(("base", "name"), [(FASTER_BASE, "r50"), (SWIN_MASK_RCNN, "swin-t")])
def test_base_backbones_are_recognised_in_the_catalog(base: str, name: str) -> None:
    assert catalog_name(load_base(base).model.backbone) == name


# --- scale ------------------------------------------------------------------------------------------

# A base with everything a scale can hide in: a RepeatDataset wrapper, multi-scale lists, a Resize by
# factor, and mmdet's own multi-scale TTA pipeline (scales (1333, 800), (666, 400), (2000, 1200)).
WRAPPED_BASE = """
_base_ = [{faster!r}, {tta!r}]
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='RandomChoiceResize', scales=[(1333, 640), (1333, 720), (1333, 800)], keep_ratio=True),
    dict(type='RandomResize', scale=[(1333, 640), (1333, 800)], keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
train_dataloader = dict(dataset=dict(_delete_=True, type='RepeatDataset', times=2, dataset=dict(
    type='CocoDataset', data_root='data/coco/', ann_file='train.json', data_prefix=dict(img='train/'),
    pipeline=train_pipeline)))
by_factor = [dict(type='Resize', scale_factor=0.5, keep_ratio=True)]
"""

# scale -> RandomChoiceResize scales, RandomResize range, TTA scales
SCALES = {
    (640, 480): ([(640, 384), (640, 432), (640, 480)], [(640, 384), (640, 480)],
                 [(640, 480), (320, 240), (960, 720)]),
    (800, 800): ([(800, 640), (800, 720), (800, 800)], [(800, 640), (800, 800)],
                 [(800, 800), (400, 400), (1200, 1200)]),
}


@pytest.fixture(scope="module")
def wrapped_base(tmp_path_factory: pytest.TempPathFactory) -> Config:
    path = tmp_path_factory.mktemp("bases") / "wrapped.py"
    # By file path: mmengine resolves '_base_ = ["mmdet::..."]' through pkg_resources, which setuptools >= 81
    # no longer ships.
    path.write_text(WRAPPED_BASE.format(faster=str(resolve_base(FASTER_BASE)),
                                        tta=str(resolve_base("mmdet::retinanet/retinanet_tta.py"))))
    return Config.fromfile(str(path))


@pytest.mark.parametrize("scale", list(SCALES))
def test_scale_reaches_every_resize(wrapped_base: Config, synth: Dataset, scale: tuple[int, int]) -> None:
    choices, resize_range, tta = SCALES[scale]
    cfg = build_config(wrapped_base, {"scale": list(scale)}, synth)
    wrapped_train = cfg.train_dataloader.dataset.dataset.pipeline

    assert _pairs(_of_type(wrapped_train, "RandomChoiceResize")[0].scales) == choices
    assert _pairs(_of_type(wrapped_train, "RandomResize")[0].scale) == resize_range
    for loader in (cfg.val_dataloader, cfg.test_dataloader):
        assert [tuple(r.scale) for r in _of_type(loader, "Resize")] == [scale]
    assert [tuple(r.scale) for r in _of_type(cfg.test_pipeline, "Resize")] == [scale]
    assert [tuple(r.scale) for r in _of_type(cfg.tta_pipeline, "Resize")] == tta
    assert {k: v for k, v in cfg.by_factor[0].items() if "scale" in k} == {"scale_factor": 0.5}


def test_scale_resizes_the_real_images(synth: Dataset) -> None:
    cfg = build_config(FASTER_BASE, {"scale": [96, 96]}, synth)
    # three loaders, and the top-level train_pipeline/test_pipeline variables
    assert [tuple(r.scale) for r in _of_type(cfg, "Resize")] == [(96, 96)] * 5

    for loader in (cfg.train_dataloader, cfg.val_dataloader):
        sample = DATASETS.build(loader.dataset)[0]
        assert tuple(sample["inputs"].shape) == (3, 96, 96)  # synth images are 160 px squares


# --- optimiser, lr ----------------------------------------------------------------------------------

# point -> optimizer fields, paramwise_cfg
OPTIMISERS = [
    ({"optimizer": "sgd"}, dict(type="SGD", lr=0.02, momentum=0.9, weight_decay=1e-4), None),
    ({"optimizer": "sgd", "lr": 0.005}, dict(type="SGD", lr=0.005, momentum=0.9, weight_decay=1e-4), None),
    ({"lr": 0.03}, dict(type="SGD", lr=0.03, momentum=0.9, weight_decay=1e-4), None),
    ({"optimizer": "adamw", "lr": 2e-4}, dict(type="AdamW", lr=2e-4, weight_decay=0.05), "swin"),
    ({"optimizer": "adamw"}, dict(type="AdamW", lr=1e-4, weight_decay=0.05), "swin"),
]


@pytest.mark.parametrize(("point", "expected", "paramwise"), OPTIMISERS)
def test_optimizer_and_lr(faster: Config, synth: Dataset, point: dict[str, Any], expected: dict[str, Any],
                          paramwise: str | None) -> None:
    cfg = build_config(faster, point, synth)
    optimizer = cfg.optim_wrapper.optimizer

    assert {k: optimizer[k] for k in expected} == expected
    if paramwise:  # exactly what mmdet's own Swin configs use
        swin = load_base(SWIN_MASK_RCNN).optim_wrapper
        assert cfg.optim_wrapper.paramwise_cfg == swin.paramwise_cfg
        assert dict(optimizer) == dict(swin.optimizer, lr=expected["lr"])
    else:
        assert "paramwise_cfg" not in cfg.optim_wrapper


# --- amp, cudnn autotuning --------------------------------------------------------------------------

AMP_BASE = "mmdet::faster_rcnn/faster-rcnn_r50_fpn_amp-1x_coco.py"  # mmdet's own fp16 config


@pytest.mark.parametrize(("base", "point", "wrapper", "dtype"), [
    (FASTER_BASE, {"amp": "fp16"}, "AmpOptimWrapper", "float16"),
    (FASTER_BASE, {"amp": "bf16", "optimizer": "adamw"}, "AmpOptimWrapper", "bfloat16"),
    (FASTER_BASE, {"amp": "fp32"}, "OptimWrapper", None),
    (AMP_BASE, {"optimizer": "sgd", "lr": 0.01}, "AmpOptimWrapper", None),  # the base's AMP survives the rewrite
    (AMP_BASE, {"optimizer": "adamw"}, "AmpOptimWrapper", None),
    (AMP_BASE, {"amp": "fp32", "optimizer": "adamw"}, "OptimWrapper", None),
    (AMP_BASE, {"amp": "bf16"}, "AmpOptimWrapper", "bfloat16"),
])
def test_amp(synth: Dataset, base: str, point: dict[str, Any], wrapper: str, dtype: str | None) -> None:
    cfg = build_config(base, point, synth)
    assert cfg.optim_wrapper.type == wrapper
    assert cfg.optim_wrapper.get("dtype") == dtype
    assert cfg.optim_wrapper.optimizer.type == {"adamw": "AdamW"}.get(point.get("optimizer", ""), "SGD")


@pytest.mark.parametrize(("base", "single"), [
    (FASTER_BASE, True), ("mmdet::faster_rcnn/faster-rcnn_r50_fpn_ms-3x_coco.py", False),
])
def test_single_scale_training(synth: Dataset, base: str, single: bool) -> None:
    assert single_scale_training(build_config(base, {"scale": [512, 512]}, synth)) is single


# --- schedule, epochs -------------------------------------------------------------------------------

@pytest.mark.parametrize(("epochs", "milestones"), [
    (1, []), (2, [1]), (3, [2]), (5, [3, 4]), (6, [4, 5]), (12, [8, 11]), (18, [12, 17]), (24, [16, 22]),
    (36, [24, 33]),
])
def test_step_milestones(epochs: int, milestones: list[int]) -> None:
    assert step_milestones(epochs) == milestones


def _epoch_lrs(cfg: Config) -> list[float]:
    """The lr of each epoch under the config's epoch-based scheduler, built by mmengine itself."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    main = [s for s in cfg.param_scheduler if s["by_epoch"]]
    assert len(main) == 1
    scheduler = PARAM_SCHEDULERS.build(dict(main[0], optimizer=optimizer))
    lrs = []
    for _ in range(cfg.train_cfg.max_epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


# point -> max_epochs, lr factor of each epoch (step) or None (cosine)
SCHEDULES = [
    ({}, 12, [1.0] * 8 + [0.1] * 3 + [0.01]),
    ({"epochs": 5}, 5, [1.0] * 3 + [0.1, 0.01]),
    ({"schedule": "step", "epochs": 24}, 24, [1.0] * 16 + [0.1] * 6 + [0.01] * 2),
    ({"schedule": "cosine", "epochs": 12}, 12, None),
    ({"schedule": "cosine", "epochs": 3}, 3, None),
]


@pytest.mark.parametrize(("point", "epochs", "factors"), SCHEDULES)
def test_schedule_fits_the_epochs(faster: Config, synth: Dataset, point: dict[str, Any], epochs: int,
                                  factors: list[float] | None) -> None:
    cfg = build_config(faster, dict(point, batch_size=4), synth)
    warmup, main = cfg.param_scheduler

    assert cfg.train_cfg.max_epochs == epochs and main["end"] == epochs
    assert warmup == dict(type="LinearLR", start_factor=0.001, by_epoch=False, begin=0,
                          end=min(500, synth.num_train_images // 4))
    lrs = _epoch_lrs(cfg)
    if factors is not None:
        assert main["type"] == "MultiStepLR"
        assert lrs == pytest.approx(factors)
    else:
        assert main["type"] == "CosineAnnealingLR" and main["T_max"] == epochs
        assert lrs[0] == 1.0 and all(a > b > 0 for a, b in zip(lrs, lrs[1:], strict=False))


def test_cosine_base_keeps_cosine_when_only_epochs_change(faster: Config, synth: Dataset) -> None:
    base = copy.deepcopy(faster)  # not Config.copy: it shares the nested dicts with the module fixture
    base.param_scheduler = [dict(type="CosineAnnealingLR", begin=0, end=12, T_max=12, by_epoch=True)]
    cfg = build_config(base, {"epochs": 6}, synth)
    assert cfg.param_scheduler[1]["type"] == "CosineAnnealingLR" and cfg.param_scheduler[1]["T_max"] == 6


@pytest.mark.parametrize("workers", [2, 3])
def test_warmup_counts_one_workers_iterations(faster: Config, synth: Dataset, workers: int) -> None:
    cfg = build_config(faster, {"batch_size": 2}, synth, workers=workers)
    images_per_worker = -(-synth.num_train_images // workers)  # mmengine's sampler pads the last worker's share
    assert cfg.param_scheduler[0]["end"] == images_per_worker // 2


def test_warmup_counts_repeated_passes(wrapped_base: Config, synth: Dataset) -> None:
    cfg = build_config(wrapped_base, {"batch_size": 4}, synth)
    assert cfg.param_scheduler[0]["end"] == synth.num_train_images * 2 // 4  # RepeatDataset times=2


# --- freeze -----------------------------------------------------------------------------------------

# backbone, freeze -> frozen_stages; ConvNeXt freezes its stem only with stage 1 (see test_freeze.py)
FREEZES = [
    ("r18", -1, -1), ("r18", 0, 0), ("r50", 2, 2), ("x101-32x4d", 4, 4),
    ("swin-t", -1, -1), ("swin-t", 0, 0), ("swin-b", 3, 3),
    ("convnext-t", -1, 0), ("convnext-t", 0, 0), ("convnext-t", 1, 1), ("convnext-t", 4, 4),
]


@pytest.mark.parametrize(("name", "freeze", "frozen_stages"), FREEZES)
def test_freeze_sets_frozen_stages(faster: Config, synth: Dataset, name: str, freeze: int,
                                   frozen_stages: int) -> None:
    cfg = build_config(faster, {"backbone": name, "freeze": freeze}, synth)
    assert cfg.model.backbone.frozen_stages == frozen_stages
    custom_keys = cfg.optim_wrapper.get("paramwise_cfg", {}).get("custom_keys", {})
    stem_held = custom_keys.get("backbone.downsample_layers.0.")
    assert stem_held == (dict(lr_mult=0.0, decay_mult=0.0) if (name, freeze) == ("convnext-t", 0) else None)


def test_freeze_applies_to_the_base_backbone(faster: Config, synth: Dataset) -> None:
    assert build_config(faster, {"freeze": 3}, synth).model.backbone.frozen_stages == 3


def test_freeze_of_an_unknown_backbone_is_refused(faster: Config, synth: Dataset) -> None:
    base = copy.deepcopy(faster)  # not Config.copy: it shares the nested dicts with the module fixture
    base.model.backbone = dict(type="RegNet", arch="regnetx_3.2gf", out_indices=(0, 1, 2, 3))
    with pytest.raises(KnobError, match="freeze.*RegNet") as caught:
        build_config(base, {"freeze": 1}, synth)
    assert caught.value.knob == "freeze" and isinstance(caught.value, BuildError)


# --- preset, batch size -----------------------------------------------------------------------------

def test_tiny_preset_narrows_neck_and_heads(cascade: Config, synth: Dataset) -> None:
    cfg = build_config(cascade, {"preset": "tiny", "batch_size": 3}, synth)
    model = cfg.model

    assert model.neck.out_channels == model.rpn_head.in_channels == model.rpn_head.feat_channels == 32
    assert {h.in_channels for h in model.roi_head.bbox_head} == {32}
    assert {h.fc_out_channels for h in model.roi_head.bbox_head} == {64}
    assert model.train_cfg.rpn_proposal.nms_pre == 256 and model.test_cfg.rpn.max_per_img == 100
    assert cfg.train_dataloader.batch_size == 3


# --- overrides --------------------------------------------------------------------------------------

# dotted key -> value, read back at the same path
OVERRIDES = {
    "model.roi_head.bbox_head.1.loss_bbox.loss_weight": 2.0,
    "model.rpn_head.anchor_generator.scales": [4, 8],
    "train_dataloader.batch_size": 1,
    "param_scheduler.1.gamma": 0.5,
    "model.backbone.drop_path_rate": 0.0,
}


def _get(cfg: Config, dotted: str) -> Any:
    node: Any = cfg._cfg_dict
    for part in dotted.split("."):
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


@pytest.mark.parametrize("key", list(OVERRIDES))
def test_override_sets_an_existing_key(cascade: Config, synth: Dataset, key: str) -> None:
    cfg = build_config(cascade, {"backbone": "swin-t"}, synth, overrides={key: OVERRIDES[key]})
    assert _get(cfg, key) == OVERRIDES[key]


# misspelt dotted key -> what the error must say
BAD_OVERRIDES = {
    "model.roi_head.bbox_head.1.loss_bbox.loss_wieght": r"loss_wieght.*did you mean 'loss_weight'",
    "model.roi_hed.bbox_head": r"'roi_hed' does not exist under model.*did you mean 'roi_head'",
    "model.roi_head.bbox_head.3.num_classes": r"model.roi_head.bbox_head is a list of 3; '3'",
    "model.backbone.out_indices.0": r"tuple",
    "train_dataloader.batch_size.x": r"batch_size is a int",
}


@pytest.mark.parametrize("key", list(BAD_OVERRIDES))
def test_override_of_a_missing_key_is_refused(cascade: Config, synth: Dataset, key: str) -> None:
    with pytest.raises(BuildError, match=BAD_OVERRIDES[key]) as error:
        build_config(cascade, {}, synth, overrides={key: 1})
    assert key in str(error.value)


def test_every_bad_override_is_reported_at_once(cascade: Config, synth: Dataset) -> None:
    with pytest.raises(BuildError) as error:
        build_config(cascade, {}, synth, overrides={"model.nek": 1, "optim_wraper.x": 2, "load_from": None})
    assert "model.nek" in str(error.value) and "optim_wraper.x" in str(error.value)


# --- the step registry ------------------------------------------------------------------------------

# Two values of every knob in the catalog, each a trial would train differently with.
TWO_VALUES: dict[str, tuple[Any, Any]] = {
    "backbone": ("r18", "r50"), "roi_head": ("faster", "cascade"), "scale": ([128, 128], [160, 160]),
    "lr": (0.01, 0.02), "schedule": ("step", "cosine"), "optimizer": ("sgd", "adamw"), "freeze": (0, 2),
    "epochs": (2, 3), "batch_size": (2, 4), "preset": ("full", "tiny"), "amp": ("fp32", "fp16"),
}


def _as_text(cfg: Config) -> str:
    return json.dumps(cfg.to_dict(), sort_keys=True, default=repr)


@pytest.mark.parametrize("knob", sorted(KNOBS))
def test_every_knob_in_the_catalog_reaches_the_config(faster: Config, synth: Dataset, knob: str) -> None:
    """A knob the catalog offers but no step reads would be searched over while every trial trains the same."""
    assert knob in TWO_VALUES, f"give this test two values of the new knob {knob}"
    first, second = (build_config(faster, {knob: value}, synth) for value in TWO_VALUES[knob])
    assert _as_text(first) != _as_text(second)


def test_a_bug_in_a_knob_step_keeps_its_type_and_traceback(
    faster: Config, synth: Dataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(build_module, "STEPS", dict(STEPS))

    @step("lr_with_a_bug", knob="lr")
    def buggy(cfg: Config, build: Build) -> None:
        cfg.optim_wrapper["optimizer"]["lr"] = build.point["learning_rate"]  # the wrong key: a bug, not bad input

    with pytest.raises(KeyError, match="learning_rate") as caught:
        build_config(faster, {"lr": 0.01}, synth)
    assert not isinstance(caught.value, UserError)
    assert "buggy" in [frame.name for frame in traceback.extract_tb(caught.value.__traceback__)]


def test_a_knob_steps_build_error_names_its_knob(faster: Config, synth: Dataset,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(build_module, "STEPS", dict(STEPS))

    @step("lr_refused", knob="lr")
    def refuse(cfg: Config, build: Build) -> None:
        raise BuildError("lr 0.01 is too small for this base config: use at least 0.02")

    with pytest.raises(KnobError, match="use at least 0.02") as caught:
        build_config(faster, {"lr": 0.01}, synth)
    assert caught.value.knob == "lr"


def test_a_step_for_an_unknown_knob_or_a_taken_name_is_refused() -> None:
    with pytest.raises(ValueError, match="'amps'.*KNOBS"):
        step("amps", knob="amps")
    with pytest.raises(ValueError, match="registered twice"):
        step("scale", knob="scale")
