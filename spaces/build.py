"""Turns a base MMDetection config and one sampled point into the config a trial trains.

Each knob is a small function ``apply_<knob>(cfg, value, ...)`` that edits an mmengine ``Config`` in place.
:func:`build_config` applies them in a fixed order (head, backbone, preset, classes, scale, optimisation,
freeze, overrides) so later knobs see the structure earlier ones set up.
"""

from __future__ import annotations

import copy
import difflib
import warnings
from collections.abc import Iterator, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from mmengine.config import Config, ConfigDict

from spaces.backbones import backbone, family_of
from spaces.dataset import Dataset

MMDET_PREFIX = "mmdet::"

# Where mmdet keeps the canonical model of each RoI head family.
_HEAD_SOURCES = {
    "faster": "_base_/models/faster-rcnn_r50_fpn.py",
    "cascade": "_base_/models/cascade-rcnn_r50_fpn.py",
    "htc": "htc/htc-without-semantic_r50_fpn_1x_coco.py",
}
_HEAD_OF_DETECTOR = {"FasterRCNN": "faster", "CascadeRCNN": "cascade", "HybridTaskCascade": "htc"}

DEFAULT_LR = {"sgd": 0.02, "adamw": 1e-4}
# mmdet's Swin configs: no weight decay on position tables and norms.
_ADAMW_PARAMWISE = dict(custom_keys={
    "absolute_pos_embed": dict(decay_mult=0.0),
    "relative_position_bias_table": dict(decay_mult=0.0),
    "norm": dict(decay_mult=0.0),
})
_MAX_WARMUP_ITERS = 500
_RESIZE_TYPES = ("Resize", "RandomResize", "RandomChoiceResize")


class BuildError(ValueError):
    """A point or override that cannot become a valid config; the message says why and what to do."""


def resolve_base(base: str) -> Path:
    """Maps ``mmdet::<rel>`` to the config file shipped in the mmdet package; other strings are paths."""
    if base.startswith(MMDET_PREFIX):
        path = Path(str(resources.files("mmdet"))) / ".mim" / "configs" / base[len(MMDET_PREFIX):]
    else:
        path = Path(base)
    if not path.is_file():
        raise BuildError(f"base config {base} not found: give a config file path or "
                         f"'{MMDET_PREFIX}<dir>/<file>.py' naming one of mmdet's own configs")
    return path


def load_base(base: str) -> Config:
    return Config.fromfile(str(resolve_base(base)))


def build_config(
    base: str | Config,
    point: Mapping[str, Any],
    dataset: Dataset,
    *,
    pretrained: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Returns the trial's config: ``base`` with the dataset, every knob in ``point`` and ``overrides``.

    Knobs absent from ``point`` keep the base config's setting, except that the schedule is always rebuilt
    so it fits the number of epochs, and remote pretrained weights are always dropped (nothing is downloaded).
    """
    cfg = copy.deepcopy(base) if isinstance(base, Config) else load_base(base)
    pretrained = pretrained or {}
    tiny = point.get("preset") == "tiny"
    if "roi_head" in point:
        apply_roi_head(cfg, point["roi_head"], dataset)
    if "backbone" in point:
        apply_backbone(cfg, point["backbone"], tiny=tiny, pretrained=pretrained.get(point["backbone"]))
    else:
        _drop_remote_init(cfg)
    if tiny:
        apply_tiny_preset(cfg)
    apply_dataset(cfg, dataset)
    if "scale" in point:
        apply_scale(cfg, point["scale"])
    if "batch_size" in point:
        cfg.train_dataloader.batch_size = int(point["batch_size"])
    apply_optimisation(cfg, point, iters_per_epoch=_iters_per_epoch(cfg, dataset))
    if "freeze" in point:
        apply_freeze(cfg, int(point["freeze"]))
    if overrides:
        apply_overrides(cfg, overrides)
    return cfg


def _iters_per_epoch(cfg: Config, dataset: Dataset) -> int:
    return max(1, dataset.num_train_images // int(cfg.train_dataloader.batch_size))


# --- roi_head ---------------------------------------------------------------------------------------

def current_head(cfg: Config) -> str | None:
    return _HEAD_OF_DETECTOR.get(cfg.model.get("type"))


def apply_roi_head(cfg: Config, head: str, dataset: Dataset) -> None:
    """Swaps in mmdet's own RoI head (and its train/test settings) for ``head`` unless already there."""
    if head == "htc":
        if not dataset.has_masks:
            raise BuildError(f"roi_head 'htc' trains a mask branch, but {dataset.train_json} has annotations "
                             "without 'segmentation': use faster or cascade, or add polygon masks")
        _enable_masks(cfg)
    if current_head(cfg) == head:
        return
    if "rpn_head" not in cfg.model:
        raise BuildError(f"roi_head needs a two-stage base config, but the base model is {cfg.model.type}: "
                         "choose a Faster/Cascade R-CNN or HTC base")
    source = load_base(MMDET_PREFIX + _HEAD_SOURCES[head]).model
    cfg.model.type = source.type
    cfg.model.roi_head = source.roi_head
    cfg.model.train_cfg = source.train_cfg
    cfg.model.test_cfg = source.test_cfg


def _enable_masks(cfg: Config) -> None:
    for node in _dicts(cfg._cfg_dict):
        if node.get("type") == "LoadAnnotations":
            node["with_mask"] = True
    cfg.model.data_preprocessor.pad_mask = True


# --- backbone ---------------------------------------------------------------------------------------

def apply_backbone(cfg: Config, name: str, *, tiny: bool = False, pretrained: str | None = None) -> None:
    """Replaces the backbone dict whole (no stale keys) and points the neck at its channels.

    ImageNet weights are loaded only from ``pretrained``, a local checkpoint path; without one the backbone
    trains from scratch and one warning says so.
    """
    chosen = backbone(name, tiny=tiny)
    new = ConfigDict(chosen.cfg)
    if pretrained:
        if not Path(pretrained).is_file():
            raise BuildError(f"pretrained checkpoint for {name} not found at {pretrained}: fix the path "
                             "under 'pretrained:' or remove it to train from scratch")
        new.init_cfg = dict(type="Pretrained", checkpoint=str(pretrained))
        new.norm_eval = chosen.family == "resnet"  # keep ImageNet BN statistics, as mmdet does
    else:
        warnings.warn(f"backbone {name}: no local pretrained checkpoint given, training from scratch",
                      stacklevel=2)
    if chosen.family == "convnext":
        cfg.custom_imports = dict(imports=["mmpretrain.models"], allow_failed_imports=False)
    cfg.model.backbone = new
    cfg.model.neck.in_channels = chosen.out_channels


def _drop_remote_init(cfg: Config) -> None:
    init = cfg.model.backbone.get("init_cfg")
    checkpoint = str(init.get("checkpoint", "")) if isinstance(init, Mapping) else ""
    if "://" in checkpoint:
        warnings.warn(f"base backbone asks for {checkpoint}; nothing is downloaded, training from scratch",
                      stacklevel=3)
        cfg.model.backbone.init_cfg = None
    if cfg.get("load_from") and "://" in str(cfg.load_from):
        cfg.load_from = None


# --- tiny preset ------------------------------------------------------------------------------------

_TINY_WIDTHS = {"out_channels": 32, "in_channels": 32, "feat_channels": 32, "conv_out_channels": 32,
                "fc_out_channels": 64}


def apply_tiny_preset(cfg: Config) -> None:
    """Narrows neck and heads and trims proposal counts: a CPU-sized detector of the same structure."""
    cfg.model.neck.out_channels = _TINY_WIDTHS["out_channels"]
    for part in ("rpn_head", "roi_head", "bbox_head"):
        for node in _dicts(cfg.model.get(part)):
            for key, width in _TINY_WIDTHS.items():
                if isinstance(node.get(key), int):
                    node[key] = width
    for node in _dicts(cfg.model.get("train_cfg")) + _dicts(cfg.model.get("test_cfg")):
        if "nms_pre" in node:
            node["nms_pre"] = min(node["nms_pre"], 256)
        if "max_per_img" in node and "nms" in node:
            node["max_per_img"] = min(node["max_per_img"], 100)
        if node.get("type") == "RandomSampler":
            node["num"] = min(node["num"], 64)


# --- dataset, classes -------------------------------------------------------------------------------

def apply_dataset(cfg: Config, dataset: Dataset) -> None:
    """Points every dataloader and evaluator at ``dataset`` and sizes every head for its classes."""
    for loader_key, ann in (("train_dataloader", dataset.train), ("val_dataloader", dataset.val),
                            ("test_dataloader", dataset.val)):
        loader = cfg.get(loader_key)
        if loader is None:
            continue
        inner = _innermost_dataset(loader.dataset)
        inner.update(data_root=str(dataset.root), ann_file=ann, data_prefix=dict(img=dataset.images + "/"),
                     metainfo=dict(classes=list(dataset.classes)))
    for key in ("val_evaluator", "test_evaluator"):
        for evaluator in _as_list(cfg.get(key)):
            evaluator.ann_file = str(dataset.val_json)
    for part in ("roi_head", "bbox_head"):
        for node in _dicts(cfg.model.get(part)):
            if "num_classes" in node:
                node["num_classes"] = len(dataset.classes)


def _innermost_dataset(node: ConfigDict) -> ConfigDict:
    """Descends through dataset wrappers (RepeatDataset, ClassBalancedDataset, ...)."""
    while "dataset" in node:
        node = node.dataset
    if "datasets" in node:
        raise BuildError("the base config concatenates several datasets; dettune trains on one: "
                         "use a base config with a single dataset")
    return node


# --- scale ------------------------------------------------------------------------------------------

def apply_scale(cfg: Config, scale: list[int] | tuple[int, int]) -> None:
    """Sets the Resize scale everywhere: train, val, test and TTA pipelines, inside any wrapper.

    A single-scale Resize gets ``scale`` exactly; multi-scale lists keep their spread, scaled so that
    their largest entry becomes ``scale``.
    """
    width, height = int(scale[0]), int(scale[1])
    for node in _dicts(cfg._cfg_dict):
        if node.get("type") not in _RESIZE_TYPES:
            continue
        key = "scales" if "scales" in node else "scale"
        value = node[key]
        if _is_pair(value):
            node[key] = (width, height)
        else:
            largest = max(value, key=lambda s: s[0] * s[1])
            node[key] = [(round(s[0] * width / largest[0]), round(s[1] * height / largest[1]))
                         for s in value]


def _is_pair(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value)


# --- optimiser, lr, schedule, epochs ----------------------------------------------------------------

def apply_optimisation(cfg: Config, point: Mapping[str, Any], *, iters_per_epoch: int) -> None:
    """Sets optimiser, lr, epochs and lr schedule together, so the schedule always fits max_epochs."""
    epochs = int(point.get("epochs", cfg.train_cfg.max_epochs))
    optimizer = point.get("optimizer")
    if optimizer is not None:
        lr = float(point.get("lr", DEFAULT_LR[optimizer]))
        cfg.optim_wrapper = _optim_wrapper(optimizer, lr, clip_grad=cfg.optim_wrapper.get("clip_grad"))
    elif "lr" in point:
        cfg.optim_wrapper.optimizer.lr = float(point["lr"])
    schedule = point.get("schedule") or _schedule_of(cfg)
    cfg.train_cfg = dict(type="EpochBasedTrainLoop", max_epochs=epochs, val_interval=1)
    cfg.param_scheduler = lr_schedule(schedule, epochs, warmup_iters=min(_MAX_WARMUP_ITERS, iters_per_epoch))
    cfg.auto_scale_lr = dict(enable=False, base_batch_size=16)


def _optim_wrapper(optimizer: str, lr: float, *, clip_grad: Any) -> ConfigDict:
    if optimizer == "sgd":
        wrapper = dict(type="OptimWrapper",
                       optimizer=dict(type="SGD", lr=lr, momentum=0.9, weight_decay=1e-4))
    else:
        wrapper = dict(type="OptimWrapper",
                       optimizer=dict(type="AdamW", lr=lr, betas=(0.9, 0.999), weight_decay=0.05),
                       paramwise_cfg=copy.deepcopy(_ADAMW_PARAMWISE))
    if clip_grad:
        wrapper["clip_grad"] = clip_grad
    return ConfigDict(wrapper)


def _schedule_of(cfg: Config) -> str:
    kinds = [str(s.get("type", "")) for s in _as_list(cfg.get("param_scheduler"))]
    return "cosine" if any("Cosine" in k for k in kinds) else "step"


def step_milestones(epochs: int) -> list[int]:
    """x0.1 at about 2/3 and 11/12 of training (12 epochs -> [8, 11], as mmdet's 1x schedule)."""
    return sorted({m for m in (round(epochs * 2 / 3), round(epochs * 11 / 12)) if 0 < m < epochs})


def lr_schedule(schedule: str, epochs: int, *, warmup_iters: int) -> list[dict[str, Any]]:
    """Linear warm-up over ``warmup_iters`` iterations, then step decay or cosine annealing to zero."""
    warmup = dict(type="LinearLR", start_factor=0.001, by_epoch=False, begin=0, end=warmup_iters)
    if schedule == "step":
        main = dict(type="MultiStepLR", begin=0, end=epochs, by_epoch=True,
                    milestones=step_milestones(epochs), gamma=0.1)
    else:
        main = dict(type="CosineAnnealingLR", begin=0, end=epochs, T_max=epochs, by_epoch=True, eta_min=0.0)
    return [warmup, main]


# --- freeze -----------------------------------------------------------------------------------------

def apply_freeze(cfg: Config, depth: int) -> None:
    """Freezes the backbone: -1 trains everything, 0 freezes the stem, k freezes the stem and stages 1..k.

    ResNet/ResNeXt and Swin take this as ``frozen_stages`` directly; mmpretrain's ConvNeXt counts the stem
    with stage 1, so it can express -1 and 1..4 but not the stem alone.
    """
    family = family_of(cfg.model.backbone)
    if family is None:
        raise BuildError(f"freeze: dettune does not know how to freeze a {cfg.model.backbone.type} backbone; "
                         "choose a ResNet/ResNeXt/Swin/ConvNeXt backbone or drop the freeze knob")
    if family == "convnext":
        if depth == 0:
            raise BuildError("freeze 0 (the stem alone) cannot be expressed for ConvNeXt, whose stem freezes "
                             "with stage 1: use -1 or 1..4")
        cfg.model.backbone.frozen_stages = max(depth, 0)
    else:
        cfg.model.backbone.frozen_stages = depth


# --- overrides --------------------------------------------------------------------------------------

def apply_overrides(cfg: Config, overrides: Mapping[str, Any]) -> None:
    """Sets raw dotted keys (list indices allowed); each must already exist in the config.

    mmengine's ``merge_from_dict`` would silently create a misspelt key, so a missing one is an error.
    """
    problems = []
    for dotted, value in overrides.items():
        parent, last, problem = _walk(cfg._cfg_dict, dotted)
        if problem:
            problems.append(problem)
        else:
            parent[last] = value
    if problems:
        raise BuildError("; ".join(problems))


def _walk(root: Any, dotted: str) -> tuple[Any, Any, str | None]:
    node, parts = root, dotted.split(".")
    for depth, part in enumerate(parts):
        key, problem = _child_key(node, part, ".".join(parts[:depth]) or "<config>")
        if problem:
            return None, None, f"override {dotted}: {problem}"
        if depth == len(parts) - 1:
            return node, key, None
        node = node[key]
    raise AssertionError("unreachable")


def _child_key(node: Any, part: str, where: str) -> tuple[Any, str | None]:
    if isinstance(node, (list, tuple)):
        if part.isdigit() and int(part) < len(node):
            return int(part), None
        return None, f"{where} is a list of {len(node)}; '{part}' is not a valid index"
    if isinstance(node, Mapping):
        if part in node:
            return part, None
        close = difflib.get_close_matches(part, [str(k) for k in node], n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return None, f"'{part}' does not exist under {where}{hint}; overrides may only change existing keys"
    return None, f"{where} is a {type(node).__name__}, it has no key '{part}'"


# --- helpers ----------------------------------------------------------------------------------------

def _dicts(node: Any) -> list[Any]:
    """Every mapping nested anywhere in ``node`` (lists included), outermost first."""
    return list(_iter_dicts(node))


def _iter_dicts(node: Any) -> Iterator[Any]:
    if isinstance(node, Mapping):
        yield node
        children: Any = node.values()
    elif isinstance(node, (list, tuple)):
        children = node
    else:
        return
    for child in children:
        yield from _iter_dicts(child)


def _as_list(node: Any) -> list[Any]:
    if node is None:
        return []
    return list(node) if isinstance(node, (list, tuple)) else [node]

