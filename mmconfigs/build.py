"""Turns a base MMDetection config and one sampled point into the config a trial trains.

The config is edited by registered steps, applied in registration order (this module's order: head, masks,
backbone, weights, preset, classes, scale, batch size, optimisation, freeze) so later steps see the structure
earlier ones set up; raw ``overrides`` come last. A step registered for a knob runs when the point sets that knob
(or always, with ``every_point=True``); a :class:`BuildError` it raises (a point or base config it cannot take) is
raised again as a :class:`KnobError` naming the knob, which is how :mod:`mmconfigs.validate` blames a problem on the
space field that caused it. Any other exception is a bug and keeps its own type and traceback.

Adding a knob takes two entries:

1. a :class:`~spaces.knobs.Knob` in :data:`spaces.knobs.KNOBS`: its name, doc and value check (the schema and
   validation use it);
2. one function here that edits the config, decorated with ``@step("<name>", knob="<name>")`` and placed where it
   must run relative to the others::

       @step("amp", knob="amp")
       def _amp(cfg: Config, build: Build) -> None:
           if build.point["amp"]:
               cfg.optim_wrapper.type = "AmpOptimWrapper"

A step that needs other knobs too reads them from ``build.point`` (as the optimisation step reads ``lr``,
``schedule`` and ``epochs``). Steps with ``knob=None`` run for every point and are nobody's fault.
"""

from __future__ import annotations

import copy
import difflib
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from mmengine.config import Config, ConfigDict

from cocodata.dataset import Dataset
from mmconfigs.backbones import backbone, catalog_name, family_of, import_mmpretrain_models
from mmconfigs.families import (
    SIZE_KEYS,
    is_detr_family,
    is_pair,
    merged_paramwise,
    narrow_group_norms,
    out_strides,
    scale_epoch_hooks,
    scale_sizes,
    stage_indices,
)
from mmconfigs.tree import as_list, config_dicts, dicts, drop_init_cfgs
from spaces.errors import UserError
from spaces.knobs import KNOBS

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
# mmpretrain's ConvNeXt freezes its stem only together with stage 1; this names the stem's parameters.
_CONVNEXT_STEM = "backbone.downsample_layers.0."


class BuildError(UserError, ValueError):
    """A point or override that cannot become a valid config; the message says why and what to do."""


class KnobError(BuildError):
    """A step registered for ``knob`` refused the point; the message is its error's, ``__cause__`` the error."""

    def __init__(self, knob: str, error: BuildError) -> None:
        super().__init__(str(error))
        self.knob = knob


@dataclass(frozen=True, kw_only=True)
class Build:
    """What every step may read: the sampled point, the dataset and the local pretrained checkpoints."""

    point: Mapping[str, Any]
    dataset: Dataset
    pretrained: Mapping[str, str]
    workers: int = 1
    """Data-parallel training processes; each sees 1/workers of an epoch."""

    @property
    def tiny(self) -> bool:
        return self.point.get("preset") == "tiny"


@dataclass(frozen=True, kw_only=True)
class Step:
    """One registered config edit."""

    name: str
    knob: str | None
    """The knob this step sets: it runs when the point has it, and a failure inside is blamed on it."""
    every_point: bool
    """Runs whether or not the point sets ``knob``."""
    edit: Callable[[Config, Build], None]

    def applies(self, point: Mapping[str, Any]) -> bool:
        return self.every_point or self.knob in point


STEPS: dict[str, Step] = {}
"""Step name -> step, in the order :func:`build_config` applies them (registration order)."""


def step(
    name: str, *, knob: str | None = None, every_point: bool = False
) -> Callable[[Callable[[Config, Build], None]], Callable[[Config, Build], None]]:
    """Registers the decorated ``edit(cfg, build)`` as the config step ``name``; see the module docstring.

    Raises:
        ValueError: a step of that name exists already, or ``knob`` is not in :data:`spaces.knobs.KNOBS`.
    """
    if name in STEPS:
        raise ValueError(f"config step {name!r} is registered twice")
    if knob is not None and knob not in KNOBS:
        raise ValueError(f"config step {name!r} sets knob {knob!r}, which spaces.knobs.KNOBS does not list")

    def register(edit: Callable[[Config, Build], None]) -> Callable[[Config, Build], None]:
        STEPS[name] = Step(name=name, knob=knob, every_point=every_point or knob is None, edit=edit)
        return edit

    return register


def resolve_base(base: str) -> Path:
    """Maps ``mmdet::<rel>`` to the config file shipped in the mmdet package; other strings are paths.

    Raises:
        BuildError: when no such file exists.
    """
    if base.startswith(MMDET_PREFIX):
        path = Path(str(resources.files("mmdet"))) / ".mim" / "configs" / base[len(MMDET_PREFIX):]
    else:
        path = Path(base)
    if not path.is_file():
        raise BuildError(f"base config {base} not found: give a config file path or "
                         f"'{MMDET_PREFIX}<dir>/<file>.py' naming one of mmdet's own configs")
    return path


def load_base(base: str) -> Config:
    """Loads a base config named as :func:`resolve_base` accepts."""
    return load_config(resolve_base(base))


def load_config(path: Path) -> Config:
    """Loads a config file; one that builds mmpretrain models (ConvNeXt) gets mmpretrain imported first."""
    if "mmpretrain" in path.read_text(errors="ignore"):
        import_mmpretrain_models()
    return Config.fromfile(str(path))


def build_config(
    base: str | Config,
    point: Mapping[str, Any],
    dataset: Dataset,
    *,
    pretrained: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    workers: int = 1,
) -> Config:
    """Returns the trial's config: ``base`` with the dataset, every knob in ``point`` and ``overrides``.

    Knobs absent from ``point`` keep the base config's setting, except that the schedule is always rebuilt
    so it fits the number of epochs, and remote pretrained weights are always dropped (nothing is downloaded).

    Args:
        base: a config path, ``mmdet::<dir>/<file>.py``, or a loaded Config (left unchanged).
        point: knob name -> value, as :mod:`spaces.knobs` lists them.
        dataset: the data every dataloader, evaluator and head is pointed at.
        pretrained: backbone name -> local ImageNet checkpoint; a backbone without one trains from scratch.
        overrides: dotted config key -> value, applied last; each key must already exist.
        workers: data-parallel training processes; each sees 1/workers of an epoch, so iteration-based
            settings (the warm-up) count one worker's iterations.

    Raises:
        KnobError: when the step of a knob fails (a :class:`BuildError`, naming the knob).
        BuildError: for a dataset or override that cannot become part of a valid config.
    """
    cfg = copy.deepcopy(base) if isinstance(base, Config) else load_base(base)
    build = Build(point=point, dataset=dataset, pretrained=pretrained or {}, workers=workers)
    for entry in STEPS.values():
        if entry.applies(point):
            _apply(entry, cfg, build)
    if overrides:
        apply_overrides(cfg, overrides)
    return cfg


def _apply(entry: Step, cfg: Config, build: Build) -> None:
    """Runs one step; a :class:`BuildError` of a knob's step is raised again as a :class:`KnobError` naming the knob.

    Only the user errors a step means are wrapped: anything else it raises is a bug and propagates as it is.
    """
    try:
        entry.edit(cfg, build)
    except BuildError as error:
        if entry.knob is None:
            raise
        raise KnobError(entry.knob, error) from error


def _iters_per_epoch(cfg: Config, dataset: Dataset, workers: int) -> int:
    """Training iterations in one epoch on one worker, counting RepeatDataset passes."""
    repeats, node = 1, cfg.train_dataloader.dataset
    while "dataset" in node:
        repeats *= int(node.get("times", 1))
        node = node.dataset
    # mmengine's DefaultSampler gives each of the workers ceil(images / workers) samples.
    per_worker = math.ceil(dataset.num_train_images * repeats / workers)
    return max(1, per_worker // int(cfg.train_dataloader.batch_size))


# --- roi_head ---------------------------------------------------------------------------------------

def current_head(cfg: Config) -> str | None:
    """The knob value naming the base model's RoI head, or None for another detector."""
    return _HEAD_OF_DETECTOR.get(cfg.model.get("type"))


@step("roi_head", knob="roi_head")
def _roi_head(cfg: Config, build: Build) -> None:
    """Swaps in mmdet's own RoI head (and its train/test settings) for the chosen one unless already there.

    Raises:
        BuildError: for htc on a dataset without masks, or a base model without an RPN.
    """
    head, dataset = build.point["roi_head"], build.dataset
    if head == "htc" and not dataset.has_masks:
        raise BuildError(f"roi_head 'htc' trains a mask branch, but {dataset.train_json} has annotations "
                         "without 'segmentation': use faster or cascade, or add polygon masks")
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


@step("masks")
def _masks(cfg: Config, build: Build) -> None:
    """Loads masks exactly when the model has a mask head.

    A mask-free head on a mask base config must not load them: mmdet's loader fails on annotations
    without 'segmentation'.

    Raises:
        BuildError: when the model has a mask head and the dataset has no masks.
    """
    dataset = build.dataset
    needs = any("mask_head" in node for node in dicts(cfg.model.get("roi_head")))
    if needs and not dataset.has_masks:
        raise BuildError(f"the base model {cfg.model.type} has a mask head, but {dataset.train_json} has "
                         "annotations without 'segmentation': set roi_head to faster or cascade, "
                         "or add polygon masks")
    for node in config_dicts(cfg):
        if node.get("type") == "LoadAnnotations":
            node["with_mask"] = needs
    if "data_preprocessor" in cfg.model:
        cfg.model.data_preprocessor.pad_mask = needs


# --- backbone ---------------------------------------------------------------------------------------

@step("backbone", knob="backbone")
def _backbone(cfg: Config, build: Build) -> None:
    """Replaces the backbone dict whole (no stale keys) and points the neck at its channels.

    The new backbone starts from scratch; the ``pretrained`` step gives it local weights.
    """
    name = build.point["backbone"]
    chosen = backbone(name, tiny=build.tiny)
    indices = _indices_like_base(cfg.model.backbone, name)
    # Assignment replaces the whole dict: nothing of the base's backbone (depth, style, ...) survives.
    cfg.model.backbone = ConfigDict(copy.deepcopy(chosen.cfg))
    if list(indices) != list(chosen.cfg["out_indices"]):
        cfg.model.backbone.out_indices = tuple(indices)
    cfg.model.neck.in_channels = [chosen.out_channels[index] for index in indices]
    if chosen.family == "convnext":
        _add_custom_import(cfg, "mmpretrain.models")
        import_mmpretrain_models()


def _indices_like_base(base_backbone: Any, name: str) -> list[int]:
    """The new backbone's out indices: the strides the base's backbone fed its neck (all four if unknown).

    DETR's ChannelMapper takes stride 32 alone, Deformable DETR's, DINO's and RTMDet's necks strides 8-32.
    """
    strides = out_strides(base_backbone)
    if strides is None:
        return [0, 1, 2, 3]
    indices = stage_indices(strides)
    if indices is None:
        raise BuildError(f"backbone {name}: the base's neck takes features at strides {strides}, but {name}'s "
                         "stages give strides 4, 8, 16 and 32: keep the base's backbone or choose another base")
    return indices


def _add_custom_import(cfg: Config, module: str) -> None:
    """Adds ``module`` to the config's custom imports, keeping those the base has."""
    current = cfg.get("custom_imports") or {}
    imports = list(current.get("imports", []))
    if module not in imports:
        imports.append(module)
    cfg.custom_imports = dict(imports=imports, allow_failed_imports=bool(current.get("allow_failed_imports")))


@step("pretrained")
def _pretrained(cfg: Config, build: Build) -> None:
    """Initialises the final backbone from its local checkpoint in ``build.pretrained``, or from scratch.

    Remote checkpoints (``torchvision://``, ``https://``, ...) anywhere in the model, and a remote
    ``load_from``, are always dropped: nothing is downloaded. Training from scratch, when weights were asked
    for (a chosen backbone, or a base config that names remote ones), gets one warning that says so. Without a
    chosen backbone the base's is looked up in the catalog by its fields.

    Raises:
        BuildError: when the configured checkpoint file does not exist.
    """
    name, pretrained = build.point.get("backbone"), build.pretrained
    dropped = _drop_remote_weights(cfg)
    asked = name is not None or bool(dropped)
    name = name or catalog_name(cfg.model.backbone)
    path = pretrained.get(name) if name else None
    if path:
        if not Path(path).is_file():
            raise BuildError(f"pretrained checkpoint for {name} not found at {path}: fix the path "
                             "under 'pretrained:' or remove it to train from scratch")
        cfg.model.backbone.init_cfg = dict(type="Pretrained", checkpoint=str(path))
        if family_of(cfg.model.backbone) == "resnet":
            cfg.model.backbone.norm_eval = True  # keep ImageNet BN statistics, as mmdet does
        return
    if asked:
        what = f"backbone {name}" if name else f"backbone {cfg.model.backbone.get('type')}"
        hint = f"; set pretrained: {{{name}: /path/to/checkpoint.pth}} to start from ImageNet" if name else ""
        remote = f" ({', '.join(dropped)} in the base config is never downloaded)" if dropped else ""
        warnings.warn(f"{what}: no local pretrained checkpoint, training from scratch{remote}{hint}",
                      stacklevel=4)


@step("mmpretrain")
def _mmpretrain(cfg: Config, build: Build) -> None:
    """Registers mmpretrain's models for a ConvNeXt, the chosen one or a base config's own."""
    if family_of(cfg.model.backbone) == "convnext":
        import_mmpretrain_models()


def _drop_remote_weights(cfg: Config) -> list[str]:
    """Removes every remote checkpoint reference from the model and ``load_from``; returns them."""
    remote = drop_init_cfgs(cfg.model, lambda init: _is_remote(init.get("checkpoint")))
    dropped = [str(init["checkpoint"]) for init in remote]
    for node in dicts(cfg.model):
        if _is_remote(node.get("pretrained")):  # the pre-init_cfg spelling some backbones still accept
            dropped.append(str(node["pretrained"]))
            node["pretrained"] = None
    if _is_remote(cfg.get("load_from")):
        dropped.append(str(cfg.load_from))
        cfg.load_from = None
    return dropped


def _is_remote(value: Any) -> bool:
    return isinstance(value, str) and "://" in value


# --- tiny preset ------------------------------------------------------------------------------------

_TINY_GN_GROUPS = 8
_TINY_WIDTHS = {"out_channels": 32, "in_channels": 32, "feat_channels": 32, "conv_out_channels": 32,
                "fc_out_channels": 64}


@step("preset", knob="preset")
def _preset(cfg: Config, build: Build) -> None:
    """``tiny`` narrows neck and heads and trims proposal counts: a CPU-sized detector of the same structure."""
    if not build.tiny:
        return
    if is_detr_family(cfg.model):
        raise BuildError(f"preset 'tiny' narrows the necks and heads of R-CNN and one-stage detectors; "
                         f"{cfg.model.type}'s transformer keeps its width: drop the preset and use a small "
                         "backbone (r18) and scale for quick runs")
    cfg.model.neck.out_channels = _TINY_WIDTHS["out_channels"]
    for part in ("rpn_head", "roi_head", "bbox_head"):
        for node in dicts(cfg.model.get(part)):
            for key, width in _TINY_WIDTHS.items():
                if isinstance(node.get(key), int):
                    node[key] = width
    for head in as_list(cfg.model.get("bbox_head")):
        narrow_group_norms(head, _TINY_GN_GROUPS)
    for node in dicts(cfg.model.get("train_cfg")) + dicts(cfg.model.get("test_cfg")):
        if "nms_pre" in node:
            node["nms_pre"] = min(node["nms_pre"], 256)
        if "max_per_img" in node and "nms" in node:
            node["max_per_img"] = min(node["max_per_img"], 100)
        if node.get("type") == "RandomSampler":
            node["num"] = min(node["num"], 64)


# --- dataset, classes -------------------------------------------------------------------------------

@step("dataset")
def _dataset(cfg: Config, build: Build) -> None:
    """Points every dataloader and evaluator at the dataset and sizes every head for its classes."""
    dataset = build.dataset
    for loader_key, ann in (("train_dataloader", dataset.train), ("val_dataloader", dataset.val),
                            ("test_dataloader", dataset.val)):
        loader = cfg.get(loader_key)
        if loader is None:
            continue
        inner = _innermost_dataset(loader.dataset)
        inner.update(data_root=str(dataset.root), ann_file=ann, data_prefix=dict(img=dataset.images + "/"),
                     metainfo=dict(classes=list(dataset.classes)))
    for key in ("val_evaluator", "test_evaluator"):
        for evaluator in as_list(cfg.get(key)):
            evaluator.ann_file = str(dataset.val_json)
    for part in ("roi_head", "bbox_head"):
        for node in dicts(cfg.model.get(part)):
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

@step("scale", knob="scale")
def _scale(cfg: Config, build: Build) -> None:
    """Sets the Resize scale everywhere: train, val, test and TTA pipelines, inside any wrapper.

    A single-scale Resize gets the scale exactly; a multi-scale list keeps its spread, scaled so that its
    largest entry becomes the scale. Test-time augmentation keeps its scales relative to the test scale:
    the one equal to the test pipeline's becomes the scale. A Resize by ``scale_factor`` alone is left as is.
    Sizes relative to the test scale (mosaic and mix-up canvases, a random resize around twice it, crops and
    pads, in RTMDet's second-stage pipeline too) keep their ratio to it.
    """
    rescale(cfg, build.point["scale"])


def rescale(cfg: Config, scale: Sequence[int]) -> None:
    """What the scale knob does, for callers outside a build (validate's smoke run at a small scale)."""
    target = (int(scale[0]), int(scale[1]))
    reference = test_scale(cfg)
    tta_groups = _tta_resize_groups(cfg)
    for group in tta_groups:
        _rescale_tta_group(group, target, reference)
    skipped = {id(node) for group in tta_groups for node in group}
    if reference is not None:  # these scale by target / reference below, with the other relative sizes
        skipped |= {id(node) for node in config_dicts(cfg)
                    if node.get("type") in SIZE_KEYS and is_pair(node.get(SIZE_KEYS[node["type"]]))}
    for node in config_dicts(cfg):
        if node.get("type") in _RESIZE_TYPES and id(node) not in skipped:
            _rescale(node, target)
    if reference is not None:
        scale_sizes(cfg, (target[0] / reference[0], target[1] / reference[1]))


def _rescale(node: Any, target: tuple[int, int]) -> None:
    """Sets one resize step's scale: exactly for one scale, keeping the spread of a multi-scale list."""
    key = "scales" if "scales" in node else "scale"
    value = node.get(key)
    if value is None:
        return
    if isinstance(value, int) or is_pair(value):
        node[key] = target
    else:
        largest = max(value, key=lambda s: s[0] * s[1])
        node[key] = _scaled(value, (target[0] / largest[0], target[1] / largest[1]))


def _scaled(scales: Any, factor: tuple[float, float]) -> list[tuple[int, int]]:
    """Each (width, height) of ``scales`` times the per-axis ``factor``, in whole pixels."""
    return [(round(s[0] * factor[0]), round(s[1] * factor[1])) for s in scales]


def test_scale(cfg: Config) -> tuple[int, int] | None:
    """The single scale the test (else val) pipeline resizes to, before any change."""
    for key in ("test_dataloader", "val_dataloader"):
        loader = cfg.get(key)
        if loader is None:
            continue
        for step in _innermost_dataset(loader.dataset).get("pipeline", []):
            if step.get("type") in _RESIZE_TYPES and is_pair(step.get("scale")):
                return int(step.scale[0]), int(step.scale[1])
    return None


def _tta_resize_groups(cfg: Config) -> list[list[Any]]:
    """The Resize steps of each TestTimeAug slot (its alternatives), wherever a TestTimeAug occurs."""
    groups = []
    for node in config_dicts(cfg):
        if node.get("type") != "TestTimeAug":
            continue
        for slot in node.get("transforms", []):
            resizes = [t for t in as_list(slot) if isinstance(t, Mapping) and t.get("type") in _RESIZE_TYPES]
            if resizes:
                groups.append(resizes)
    return groups


def _rescale_tta_group(group: list[Any], target: tuple[int, int], reference: tuple[int, int] | None) -> None:
    """Scales a TTA slot's alternative sizes by target / test scale, so their spread survives."""
    pairs = [step for step in group if is_pair(step.get("scale"))]
    if len(pairs) < 2 or reference is None:
        for step in group:
            _rescale(step, target)
        return
    factor = (target[0] / reference[0], target[1] / reference[1])
    for step in pairs:
        step["scale"] = _scaled([step["scale"]], factor)[0]


def single_scale_training(cfg: Config) -> bool:
    """Whether training resizes to one scale (no multi-scale augmentation), so input shapes repeat."""
    resizes = [node for node in dicts(cfg.train_dataloader) if node.get("type") in _RESIZE_TYPES]
    return bool(resizes) and all(node["type"] == "Resize" and is_pair(node.get("scale")) for node in resizes)


# --- batch size, optimiser, lr, schedule, epochs ----------------------------------------------------

@step("batch_size", knob="batch_size")
def _batch_size(cfg: Config, build: Build) -> None:
    cfg.train_dataloader.batch_size = int(build.point["batch_size"])


@step("optimizer", knob="optimizer", every_point=True)
def _optimisation(cfg: Config, build: Build) -> None:
    """Sets optimiser, lr, epochs and lr schedule together, so the schedule always fits max_epochs."""
    point = build.point
    iters_per_epoch = _iters_per_epoch(cfg, build.dataset, build.workers)
    epochs = int(point.get("epochs", cfg.train_cfg.max_epochs))
    optimizer = point.get("optimizer")
    if optimizer is not None:
        lr = float(point.get("lr", DEFAULT_LR[optimizer]))
        cfg.optim_wrapper = _optim_wrapper(optimizer, lr, base=cfg.optim_wrapper)
    elif "lr" in point:
        cfg.optim_wrapper.optimizer.lr = float(point["lr"])
    schedule = point.get("schedule") or _schedule_of(cfg)
    scale_epoch_hooks(cfg, int(cfg.train_cfg.max_epochs), epochs)
    cfg.train_cfg = dict(type="EpochBasedTrainLoop", max_epochs=epochs, val_interval=1)
    cfg.param_scheduler = lr_schedule(schedule, epochs, warmup_iters=min(_MAX_WARMUP_ITERS, iters_per_epoch))
    cfg.auto_scale_lr = dict(enable=False, base_batch_size=16)


def _optim_wrapper(optimizer: str, lr: float, *, base: Mapping[str, Any]) -> ConfigDict:
    """mmdet's settings for ``optimizer`` at ``lr``, keeping the base wrapper's gradient clipping, AMP and
    parameter-wise settings (DETRs train the backbone at a tenth of the lr and clip gradients)."""
    if optimizer == "sgd":
        wrapper = dict(type="OptimWrapper",
                       optimizer=dict(type="SGD", lr=lr, momentum=0.9, weight_decay=1e-4))
    else:
        wrapper = dict(type="OptimWrapper",
                       optimizer=dict(type="AdamW", lr=lr, betas=(0.9, 0.999), weight_decay=0.05))
    merged = merged_paramwise(base.get("paramwise_cfg"), _ADAMW_PARAMWISE if optimizer == "adamw" else None)
    if merged:
        wrapper["paramwise_cfg"] = merged
    if base.get("clip_grad"):
        wrapper["clip_grad"] = base["clip_grad"]
    if base.get("type") == _AMP_WRAPPER:
        wrapper.update({key: base[key] for key in ("type", *_AMP_SETTINGS) if key in base})
    return ConfigDict(wrapper)


_AMP_WRAPPER = "AmpOptimWrapper"
_AMP_SETTINGS = ("dtype", "loss_scale")
_AMP_DTYPES = {"fp16": "float16", "bf16": "bfloat16"}


@step("amp", knob="amp")
def _amp(cfg: Config, build: Build) -> None:
    """fp32 trains without autocast; fp16 and bf16 autocast through mmengine's AmpOptimWrapper (CUDA only)."""
    wrapper = cfg.optim_wrapper
    precision = build.point["amp"]
    if precision == "fp32":
        wrapper.type = "OptimWrapper"
        for key in _AMP_SETTINGS:
            wrapper.pop(key, None)
    else:
        wrapper.type = _AMP_WRAPPER
        wrapper.dtype = _AMP_DTYPES[precision]


def _schedule_of(cfg: Config) -> str:
    """The base config's schedule kind, kept when the point does not choose one."""
    kinds = [str(s.get("type", "")) for s in as_list(cfg.get("param_scheduler"))]
    return "cosine" if any("Cosine" in k for k in kinds) else "step"


def step_milestones(epochs: int) -> list[int]:
    """x0.1 at about 2/3 and 11/12 of training: 12 epochs -> [8, 11] as mmdet's 1x, 24 -> [16, 22].

    Rounds halves up (Python's ``round`` would send 6 * 11/12 = 5.5 to 6), and keeps the second decay
    inside training when 11/12 rounds onto the last epoch (5 epochs -> [3, 4], not [3]).
    """
    first = math.floor(epochs * 2 / 3 + 0.5)
    second = min(math.floor(epochs * 11 / 12 + 0.5), epochs - 1)
    return sorted({m for m in (first, second) if 0 < m < epochs})


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

@step("freeze", knob="freeze")
def _freeze(cfg: Config, build: Build) -> None:
    """Freezes the backbone: -1 trains everything, 0 freezes the stem, k freezes the stem and stages 1..k.

    ResNet/ResNeXt and Swin take this as ``frozen_stages`` directly. mmpretrain's ConvNeXt counts the stem
    with stage 1, so ``frozen_stages`` k >= 1 means the same; its stem alone (0) is held still by a zero
    learning rate and weight decay for those parameters instead.

    Raises:
        BuildError: for a backbone family dettune does not know how to freeze.
    """
    depth = int(build.point["freeze"])
    family = family_of(cfg.model.backbone)
    if family is None:
        raise BuildError(f"freeze: dettune does not know how to freeze a {cfg.model.backbone.type} backbone; "
                         "choose a ResNet/ResNeXt/Swin/ConvNeXt backbone or drop the freeze knob")
    if family != "convnext":
        cfg.model.backbone.frozen_stages = depth
        return
    cfg.model.backbone.frozen_stages = max(depth, 0)
    if depth == 0:
        _hold_still(cfg, _CONVNEXT_STEM)


def _hold_still(cfg: Config, prefix: str) -> None:
    """Gives the parameters whose names contain ``prefix`` no learning rate and no weight decay."""
    paramwise = cfg.optim_wrapper.get("paramwise_cfg") or ConfigDict()
    custom_keys = paramwise.get("custom_keys") or ConfigDict()
    custom_keys[prefix] = dict(lr_mult=0.0, decay_mult=0.0)
    paramwise["custom_keys"] = custom_keys
    cfg.optim_wrapper.paramwise_cfg = paramwise


# --- overrides --------------------------------------------------------------------------------------

def apply_overrides(cfg: Config, overrides: Mapping[str, Any]) -> None:
    """Sets raw dotted keys (list indices allowed); each must already exist in the config.

    mmengine's ``merge_from_dict`` would silently create a misspelt key, so a missing one is an error.

    Raises:
        BuildError: naming every key that does not exist, with the closest existing one.
    """
    problems = []
    for dotted, value in overrides.items():
        parent, last, problem = _walk(cfg, dotted)
        if problem:
            problems.append(problem)
        else:
            parent[last] = value
    if problems:
        raise BuildError("; ".join(problems))


def _walk(root: Any, dotted: str) -> tuple[Any, Any, str | None]:
    """Follows ``dotted`` from ``root``: (container, key, None) for an existing key, else (.., .., problem)."""
    node, parts = root, dotted.split(".")
    for depth, part in enumerate(parts):
        where = ".".join(parts[:depth]) or "<config>"
        key, problem = _child_key(node, part, where)
        if problem:
            return None, None, f"override {dotted}: {problem}"
        if depth == len(parts) - 1:
            if isinstance(node, tuple):  # tuples cannot change in place
                return None, None, f"override {dotted}: {where} is a tuple; override {where} as a whole"
            return node, key, None
        node = node[key]
    raise AssertionError("unreachable")


def _child_key(node: Any, part: str, where: str) -> tuple[Any, str | None]:
    """The key or index ``part`` names in ``node``, or the problem, with the closest existing key."""
    if isinstance(node, (list, tuple)):
        if part.isdigit() and int(part) < len(node):
            return int(part), None
        return None, f"{where} is a list of {len(node)}; '{part}' is not a valid index"
    if isinstance(node, Mapping | Config):  # the Config itself is no Mapping, but has keys
        if part in node:
            return part, None
        close = difflib.get_close_matches(part, [str(k) for k in node], n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return None, f"'{part}' does not exist under {where}{hint}; overrides may only change existing keys"
    return None, f"{where} is a {type(node).__name__}, it has no key '{part}'"
