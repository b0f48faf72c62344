"""Checks a search space without training: everything a search would trip over, reported at once.

:func:`check_file` runs these stages and collects every :class:`~spaces.errors.Problem` they find:

1. the schema and its rules (:func:`spaces.schema.load_space`);
2. the base config exists and mmengine can load it;
3. every ``pretrained`` checkpoint exists;
4. every image decodes and every box fits its image (:func:`cocodata.datacheck.check_dataset`), and the dataset
   opens as COCO (:func:`cocodata.dataset.open_dataset`); an area metric (``val/bbox_mAP_s`` ...)
   has val objects of its area range, and a mask head (``roi_head: htc``) has masks to learn from;
5. a base model without a bbox head (SOLO, SOLOv2, Mask2Former, an RPN) is refused: it reports no
   ``val/bbox_mAP``;
6. every combination of the searched choice/grid values (numeric ranges at their low end) becomes a config,
   and every distinct model among them is constructed on the ``meta`` device: no memory, no weights, a
   fraction of a second even for Swin-B. Combinations that only change the optimiser, schedule or data
   pipeline give the same model and are constructed once;
7. a config that needs data the dataset cannot have (semantic maps) is refused with the fix, and a test scale
   below the smallest input the model's feature maps take (found on the meta device) is a problem of ``scale``;
8. every distinct (model, pipeline) combination runs a trial's first step (:mod:`mmconfigs.smoke`): a real Runner,
   one training iteration and one validation pass on a handful of images, on the CPU, at a small image scale.
   A failure is blamed on the knob values that no passing combination has, or on no knob.

All problems end up in one :class:`~spaces.errors.SpaceError`; a space without problems gives a
:class:`Validation`, which :func:`summary` prints on one screen.
"""

from __future__ import annotations

import copy
import itertools
import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from mmengine.config import Config
from mmengine.registry import DefaultScope
from mmengine.utils import import_modules_from_strings
from pydantic import ValidationError

from cocodata.datacheck import DataCheck, check_dataset, fix_line, group_line
from cocodata.datacleaning import Cleaned, can_clean, clean
from cocodata.dataset import Dataset, DatasetError, open_dataset
from cocodata.imagescan import terminal
from mmconfigs.build import BuildError, KnobError, apply_overrides, build_config, load_base, test_scale
from mmconfigs.smoke import FirstStep, SmokeError, SmokeTrainer, features_fail, meta_device, smallest_side, smoke_scale
from mmconfigs.tree import config_dicts, dicts
from spaces.distributions import Choice, Distribution, Grid, LogUniform, QUniform, RandInt, Uniform
from spaces.errors import Problem, Problems, SpaceError, UserError, one_line, raised_by_dettune, root_cause
from spaces.knobs import show_value
from spaces.schema import DataSpec, Limit, Space, load_space

AREA_METRICS = {
    "val/bbox_mAP_s": ("s", "small", "area < 32²"),
    "val/bbox_mAP_m": ("m", "medium", "32² <= area < 96²"),
    "val/bbox_mAP_l": ("l", "large", "area >= 96²"),
}
"""Area metrics: the COCO area range each needs in the val set, its name and its bounds."""

_MODEL_KNOBS = ("backbone", "roi_head", "preset", "freeze")
"""Knobs that change the model itself, in the order a failure to build it is blamed on them."""


@dataclass(frozen=True, kw_only=True)
class Validation:
    """What checking a valid space found.

    Attributes:
        file: The space file (or a label for in-memory data).
        space: The space.
        dataset: The opened dataset.
        combinations: Knob combinations turned into configs.
        models: Distinct models constructed from them.
        trained: Distinct (model, pipeline) combinations that ran a trial's first step.
        train_seconds: What those runs cost.
        notes: Things worth knowing that don't stop a search, e.g. backbones training from scratch.
        data_check: Every image and box checked: the dataset card and its warnings.
        cleaned: With ``data.on_bad: skip``, the annotations without the bad items (``dataset`` reads them).
    """

    file: str
    space: Space
    dataset: Dataset
    combinations: int
    models: int
    trained: int = 0
    train_seconds: float = 0.0
    notes: tuple[str, ...] = ()
    data_check: DataCheck | None = None
    cleaned: Cleaned | None = None


def check_file(path: str | Path, *, first_step: FirstStep) -> Validation:
    """Checks a space file: its schema, its base config, its data and every model it can produce.

    Args:
        path: The space YAML file.
        first_step: Runs a trial's first step (``trainers.smoke.first_step``).

    Returns:
        What the check found, for :func:`summary`.

    Raises:
        SpaceError: With every problem of every stage. When the schema is broken, the base config and the
            data are still checked, as far as those sections are valid.
    """
    file = str(path)
    try:
        space = load_space(path)
    except SpaceError as error:
        raise SpaceError([*error.problems, *_files_of_broken_space(path, file)]) from None
    return check_space(space, file, first_step=first_step)


def check_space(space: Space, file: str = "<space>", *, first_step: FirstStep) -> Validation:
    """Checks the files a valid space refers to and builds every model it can produce.

    Args:
        space: The space, e.g. from :func:`~spaces.schema.load_space` or ``Space.from_json``.
        file: Names the source in problems.
        first_step: Runs a trial's first step (``trainers.smoke.first_step``).

    Returns:
        What the check found, for :func:`summary`.

    Raises:
        SpaceError: With every problem found.
    """
    out = Problems(file, once_per_value=True)
    base = _check_base(space.base, out)
    pretrained = _check_pretrained(space, out)
    dataset, data_check, cleaned = _check_dataset(space.data, out)
    if dataset is not None:
        _check_area_metric(space, dataset, out)
        _check_masks(space, dataset, base, out)
    counts = _Counts()
    if base is not None and _predicts_boxes(space, base, out):
        _check_models(space, base, dataset, pretrained, out, counts, first_step)
    if out.items or dataset is None:
        raise SpaceError(out.items)
    return Validation(file=file, space=space, dataset=dataset, combinations=counts.combinations,
                      models=counts.models, trained=counts.trained, train_seconds=counts.train_seconds,
                      notes=tuple(_notes(space)), data_check=data_check, cleaned=cleaned)


@dataclass
class _Counts:
    combinations: int = 0
    models: int = 0
    trained: int = 0
    train_seconds: float = 0.0


def _files_of_broken_space(path: str | Path, file: str) -> list[Problem]:
    """Checks the base config and the data of a space whose schema is broken, where those are valid."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return []  # load_space has reported it
    if not isinstance(data, dict):
        return []
    out = Problems(file, once_per_value=True)
    if isinstance(data.get("base"), str) and data["base"]:
        _check_base(data["base"], out)
    try:
        spec = DataSpec.model_validate(data.get("data"))
    except ValidationError:
        return out.items
    _check_dataset(spec, out)
    return out.items


# ---------------------------------------------------------------------------------------------------------
# Files: base config, checkpoints, dataset.


def _check_base(base: str, out: Problems) -> Config | None:
    """Loads the base config; returns None (and adds the problem) if it is missing or broken."""
    try:
        return load_base(base)
    except BuildError as error:
        out.add("base", base, str(error))
    except Exception as error:  # whatever executing a broken config file raises
        out.add("base", base, f"mmengine can't load this config ({type(error).__name__}: {error}): fix the file "
                "or choose another base")
    return None


def _check_pretrained(space: Space, out: Problems) -> dict[str, str]:
    """Returns the ``pretrained`` checkpoints that exist; each missing one is a problem."""
    found = {}
    for name, path in space.pretrained.items():
        if Path(path).is_file():
            found[name] = path
        else:
            out.add(f"pretrained.{name}", path, "checkpoint file not found: fix the path, or remove the entry to "
                    "train this backbone from scratch")
    return found


def _check_dataset(spec: DataSpec, out: Problems) -> tuple[Dataset | None, DataCheck | None, Cleaned | None]:
    """Checks every image and box, then opens the dataset (with ``on_bad: skip``, a cleaned copy of its
    annotations); its dataset is None (and the problems are added, each at the field to fix) if it can't be used."""
    try:
        checked = check_dataset(spec.root, spec.train, spec.val, spec.images, progress=terminal())
        if checked.errors and spec.skips_bad and can_clean(checked):
            cleaned = clean(checked, clip=spec.clips_boxes)
            paths = cleaned.cached()
            return (open_dataset(spec.root, str(paths[spec.train]), str(paths[spec.val]), spec.images), checked,
                    cleaned)
        if checked.errors:
            for split, kind, items in checked.groups(errors=True):
                field = "data.train" if split == spec.train else "data.val"
                out.add(field, split, group_line(split, kind, items))
            out.add("data", spec.root, fix_line(spec.root, spec.train, spec.val, spec.images))
            return None, checked, None
        return open_dataset(spec.root, spec.train, spec.val, spec.images), checked, None
    except DatasetError as error:
        message = str(error)
        field = _dataset_field(message, spec)
        out.add(field, getattr(spec, field.removeprefix("data.")), message)
    return None, None, None


def _dataset_field(message: str, spec: DataSpec) -> str:
    """The ``data`` field a :class:`DatasetError` message is about: the first of its files it names."""
    if message.startswith("dataset root"):
        return "data.root"
    if "missing from" in message:
        return "data.images"
    root = Path(spec.root)
    places = {"data.train": message.find(str(root / spec.train)), "data.val": message.find(str(root / spec.val))}
    named = {field: place for field, place in places.items() if place >= 0}
    return min(named, key=lambda field: named[field]) if named else "data.root"


def _stand_in(spec: DataSpec) -> Dataset:
    """A dataset for building models when the real one can't be opened (its problem is reported already)."""
    return Dataset(root=Path(spec.root), train=spec.train, val=spec.val, images=spec.images, classes=("object",),
                   has_masks=True, num_train_images=1, val_area_ranges=frozenset("sml"))


def _check_area_metric(space: Space, dataset: Dataset, out: Problems) -> None:
    """An area metric needs val objects of its area range; COCO reports -1 (no score) otherwise.

    That holds for the primary metric, each objective and each limit: no trial would report the metric.
    """
    uses = [("metric", space.metric),
            *((f"objectives.{i}.metric", o.metric) for i, o in enumerate(space.objectives)),
            *((f"constraints.{metric}", metric) for metric in space.constraints)]
    for field, metric in uses:
        if metric not in AREA_METRICS:
            continue
        code, word, bounds = AREA_METRICS[metric]
        if code not in dataset.val_area_ranges:
            out.add(field, metric, f"{dataset.val_json} has no {word} objects ({bounds}), so COCO reports -1 "
                    f"(no score) and no trial reports {metric}: use another metric, or a val set with {word} objects")


def _check_masks(space: Space, dataset: Dataset, base: Config | None, out: Problems) -> None:
    """A mask head (HTC, or a mask base config) needs polygon masks on every training annotation."""
    if dataset.has_masks:
        return
    rule = (f"trains a mask branch, but {dataset.train_json} has annotations without 'segmentation': "
            "use a box-only head (faster, cascade), or add polygon masks")
    field, values = _knob_values(space, "roi_head")
    if field is not None and "htc" in values:
        out.add(field, "htc", f"roi_head 'htc' {rule}")
    elif field is None and base is not None and "mask_head" in (base.model.get("roi_head") or {}):
        out.add("base", space.base, f"the base model {rule}")


def _knob_values(space: Space, name: str) -> tuple[str | None, list[Any]]:
    """The field that sets knob ``name`` and the values it can take; ``(None, [])`` if the space doesn't."""
    if name in space.space:
        dist = space.space[name]
        return f"space.{name}", list(dist.values) if isinstance(dist, Choice | Grid) else []
    if name in space.fixed:
        return f"fixed.{name}", [space.fixed[name]]
    return None, []


# ---------------------------------------------------------------------------------------------------------
# Models: every knob combination becomes a config, every distinct model is constructed once.


def combinations(space: Space) -> list[dict[str, Any]]:
    """Returns the searched knobs' combinations: every choice/grid value, numeric ranges at their low end."""
    axes = {name: _axis(dist) for name, dist in space.space.items()}
    return [dict(zip(axes, values, strict=True)) for values in itertools.product(*axes.values())]


def _axis(dist: Distribution) -> list[Any]:
    """The values of one knob that the model check tries."""
    return list(dist.values) if isinstance(dist, Choice | Grid) else [dist.low]


def _check_models(space: Space, base: Config, dataset: Dataset | None, pretrained: dict[str, str],
                  out: Problems, counts: _Counts, first_step: FirstStep) -> None:
    """Builds every combination's config, constructs each distinct model and runs each distinct (model,
    pipeline)'s first step once; without a usable dataset (its problem is reported already) it only builds."""
    from mmdet.utils import register_all_modules

    register_all_modules(init_default_scope=False)
    combos = combinations(space)
    models: dict[str, Any] = {}  # model key -> the model on the meta device, None if it can't be constructed
    smoke = SmokeTrainer(first_step)
    tried: list[tuple[dict[str, Any], SmokeError | None]] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "training from scratch" and friends, once per combination
        for combo in combos:
            cfg = _config_of(space, base, combo, dataset or _stand_in(space.data), pretrained, out)
            if cfg is None:
                continue
            key = _model_key(cfg)
            if key not in models:
                models[key] = _construct(space, cfg, combo, out)
            model = models[key]
            if dataset is None or model is None or not _has_data_it_needs(space, cfg, combo, out):
                continue
            fits, min_side = _input_size(space, base, cfg, combo, model, out)
            if fits:
                tried.append((combo, _step_failure(smoke, cfg, min_side)))
    for combo, failure in tried:
        if failure is not None:
            out.add(*_blamed(space, combo, failure, [c for c, f in tried if f is None]))
    counts.combinations, counts.models = len(combos), len(models)
    counts.trained, counts.train_seconds = smoke.runs, smoke.seconds


def _config_of(
    space: Space, base: Config, combo: dict[str, Any], dataset: Dataset, pretrained: dict[str, str], out: Problems
) -> Config | None:
    """The trial config of one combination, as a trial builds it; None (and a problem) if it can't be built."""
    point = {**space.point_defaults(), **combo}
    try:
        cfg = build_config(base, point, dataset, pretrained=pretrained)
    except BuildError as error:
        knob = error.knob if isinstance(error, KnobError) else None  # the registered step that failed
        field, value = _knob_field(space, knob, point)
        out.add(field, value, str(error) + _context(space, combo, knob))
        return None
    for dotted, value in space.overrides.items():
        try:
            apply_overrides(cfg, {dotted: value})
        except BuildError as error:
            out.add(f"overrides.{dotted}", value, str(error) + _context(space, combo, None))
    return cfg


def _knob_field(space: Space, knob: str | None, point: dict[str, Any]) -> tuple[str, Any]:
    """The field and value a problem of ``knob`` is reported at; the base config if the space doesn't set it."""
    if knob in space.space:
        return f"space.{knob}", point[knob]
    if knob in space.fixed:
        return f"fixed.{knob}", point[knob]
    return "base", space.base


def _context(space: Space, combo: dict[str, Any], knob: str | None) -> str:
    """``" (with backbone=convnext-t, ...)"``: the other searched values of the failing combination."""
    others = [f"{name}={show_value(value)}" for name, value in combo.items()
              if name != knob and isinstance(space.space[name], Choice | Grid)]
    return f" (with {', '.join(others)})" if others else ""


def _model_key(cfg: Config) -> str:
    """What decides the constructed model: the model dict and the modules it imports."""
    return json.dumps([cfg.model.to_dict(), cfg.get("custom_imports")], sort_keys=True, default=repr)


def _construct(space: Space, cfg: Config, combo: dict[str, Any], out: Problems) -> Any:
    """Constructs the model on the meta device; a failure becomes a problem of the knob most likely at fault.

    Returns:
        The model, or None if it can't be constructed.

    Raises:
        Exception: what dettune's own code raised (a bug).
    """
    point = {**space.point_defaults(), **combo}
    imports = cfg.get("custom_imports")
    if imports:
        try:
            import_modules_from_strings(**imports)
        except ImportError as error:
            field, value = _knob_field(space, "backbone" if "backbone" in point else None, point)
            out.add(field, value, f"the model needs custom_imports {list(imports['imports'])}, which can't be "
                    f"imported ({_root_cause(error)}): install what is missing")
            return None
    try:
        return _build_on_meta(cfg)
    except Exception as error:  # a config that mmdet can't turn into a model
        if raised_by_dettune(error) and not isinstance(error, UserError):
            raise
        knob = next((name for name in _MODEL_KNOBS if name in space.space), None)
        field, value = _knob_field(space, knob, point)
        rule = f"mmdet can't build this model ({type(error).__name__}: {error})"
        out.add(field, value, rule + _context(space, combo, knob))
        return None


# ---------------------------------------------------------------------------------------------------------
# Training: the data a config needs, and one forward + loss per distinct (model, pipeline).

_SEMANTIC_FREE_HTC = "mmdet::htc/htc-without-semantic_r50_fpn_1x_coco.py"


def _semantic_needs(cfg: Config) -> list[str]:
    """The config keys that need semantic segmentation maps (COCO-stuff style PNGs beside the images)."""
    needs = []
    if (cfg.model.get("roi_head") or {}).get("semantic_head") is not None:
        needs.append("model.roi_head.semantic_head")
    if any(node.get("type") == "LoadAnnotations" and node.get("with_seg") for node in config_dicts(cfg)):
        needs.append("LoadAnnotations with_seg=True")
    if any(isinstance(node.get("data_prefix"), dict) and node.data_prefix.get("seg")
           for node in config_dicts(cfg)):
        needs.append("data_prefix.seg")
    return needs


def _has_data_it_needs(space: Space, cfg: Config, combo: dict[str, Any], out: Problems) -> bool:
    """Refuses a config that reads semantic maps: a dettune dataset (COCO boxes and polygons) has none.

    Refused rather than edited: dropping the semantic branch trains another model than the base names (HTC's
    semantic branch is part of its published result), and mmdet ships the semantic-free variant to name.
    """
    needs = _semantic_needs(cfg)
    if not needs:
        return True
    head = "; or search roi_head: htc on a Faster/Cascade R-CNN base" if "roi_head" not in combo else ""
    out.add("base", space.base, f"the config needs semantic segmentation maps ({', '.join(needs)}), which a "
            f"COCO detection dataset does not have, so every trial would fail reading them: use base "
            f"{_SEMANTIC_FREE_HTC} (HTC without the semantic branch){head}")
    return False


def _predicts_boxes(space: Space, base: Config, out: Problems) -> bool:
    """Refuses a base model without a bbox head: it reports no ``val/bbox_mAP``, the metric dettune searches on.

    Instance-segmentation-only models (SOLO, SOLOv2, Mask2Former, MaskFormer) predict masks; an RPN predicts
    class-free proposals. No knob adds a bbox head (``roi_head`` needs a two-stage detector).
    """
    model = base.model
    if any("bbox_head" in node for node in dicts(model)):
        return True
    if any("mask_head" in node or "panoptic_head" in node for node in dicts(model)):
        predicts = "masks only (instance or panoptic segmentation)"
    elif "rpn_head" in model:
        predicts = "region proposals only"
    else:
        return True  # a wrapper of another library's model: its own check decides
    out.add("base", space.base, f"the base model {model.get('type')} has no bbox head: it predicts {predicts}, so "
            "no trial reports val/bbox_mAP, the box metrics dettune searches on: choose a detector with a bbox "
            "head (for masks too: Mask R-CNN, Cascade Mask R-CNN, HTC, RTMDet-Ins)")
    return False


def _input_size(space: Space, base: Config, cfg: Config, combo: dict[str, Any], model: Any,
                out: Problems) -> tuple[bool, int | None]:
    """Checks the trial's test scale against the smallest input the model's feature maps take.

    Returns:
        Whether the test scale is large enough (a problem of ``scale`` if not), and that smallest side when
        the smoke scale is below it (None when the smoke scale fits, or when the features fail at every size:
        then the first step itself decides).
    """
    trial = test_scale(cfg)
    smoke = smoke_scale(cfg) or trial
    if trial is None or smoke is None or features_fail(model, min(smoke)) is None:
        return True, None
    upper = max(min(trial), min(test_scale(base) or trial))
    if features_fail(model, upper) is not None:
        return True, None
    floor = smallest_side(model, min(smoke), upper)
    if min(trial) >= floor:
        return True, floor
    error = features_fail(model, min(trial))
    assert error is not None  # trial <= smoke's side < floor
    field, value = _knob_field(space, "scale", {**space.point_defaults(), **combo})
    out.add(field, value, f"the model's feature maps vanish on images smaller than {floor}x{floor} px (at the "
            f"test scale {list(trial)}: {one_line(error)}): choose a scale of at least [{floor}, {floor}] (more "
            f"for images that are not square: Resize keeps their aspect ratio)" + _context(space, combo, "scale"))
    return False, None


_SMOKE_FIXES = {
    "train dataset": "the base config's train dataset settings don't fit this data: check data.* and the "
                     "base's train_dataloader.dataset",
    "val dataset": "the base config's val dataset or evaluator settings don't fit this data: check data.* and the "
                   "base's val_dataloader.dataset and val_evaluator",
    "train pipeline": "a step of the base's train pipeline needs a file or annotation this dataset lacks: remove "
                      "or replace that step in the base config, or choose a base made for box/polygon data",
    "val pipeline": "a step of the base's val pipeline needs a file or annotation this dataset lacks: remove or "
                    "replace that step in the base config",
    "model": "mmdet can't build this model on the CPU: check the base config's model",
    "optimizer": "the optimiser or lr schedule can't be built for this model: check the base's optim_wrapper "
                 "(paramwise_cfg) and param_scheduler",
    "hooks": "a hook of the base config, or the model's weight init, fails before training: check custom_hooks "
             "and the model's init_cfg",
    "forward + loss": "the model and its inputs don't fit (channels, shapes or keys): check the base config's "
                      "model and its train pipeline",
    "prediction": "the model's test settings don't fit its heads: check the base config's model.test_cfg",
    "evaluation": "the val_evaluator can't score this model's predictions: check the base's val_evaluator",
}


_TOO_SMALL = (
    "Kernel size can't be greater than actual input size",  # a convolution on a map smaller than its kernel
    "Output size is too small",  # a pooling layer's
    "Expected more than 1 value per channel",  # a norm layer on a 1 px map of one image
    "selected index k out of range",  # a DETR selecting more queries than the encoder has tokens
)
"""What torch raises when a feature map is too small for the layer that reads it: a larger image fixes it."""


def _too_small(failure: SmokeError) -> bool:
    text = str(root_cause(failure.error))
    return any(words in text for words in _TOO_SMALL)


def _step_failure(smoke: SmokeTrainer, cfg: Config, min_side: int | None) -> SmokeError | None:
    """Runs the first step at the smoke scale; a feature map too small there is tried again at the trial's own
    scale, so that only a failure the trial would meet refuses the space."""
    failure = smoke.run(cfg, min_side=min_side)
    trial = test_scale(cfg)
    if failure is not None and _too_small(failure) and trial is not None:
        failure = smoke.run(cfg, min_side=min(trial))  # no shrinking below that side: the trial's scale
    return failure


def _blamed(space: Space, combo: dict[str, Any], failure: SmokeError,
            passed: list[dict[str, Any]]) -> tuple[str, Any, str]:
    """The field, value and rule of a failed first step: ``scale`` for a feature map too small, else the searched
    values no passing combination has, or none.

    A value that trains in another combination is not the cause; when every combination tried fails, no knob
    explains the failure and the base config is named.
    """
    rule = f"the first training step fails at the {failure}"
    if _too_small(failure) and ("scale" in space.space or "scale" in space.fixed):
        field, value = _knob_field(space, "scale", {**space.point_defaults(), **combo})
        return field, value, (f"{rule}: a feature map is too small for the layer that reads it at this scale: "
                              f"choose a larger scale{_context(space, combo, 'scale')}")
    searched = [name for name in combo if isinstance(space.space[name], Choice | Grid)]
    culprits = [name for name in searched if passed and all(other[name] != combo[name] for other in passed)]
    fix = _SMOKE_FIXES[failure.stage]
    if culprits:
        values = ", ".join(f"{name}={show_value(combo[name])}" for name in culprits)
        return (f"space.{culprits[0]}", combo[culprits[0]],
                f"{rule} with {values}, which no combination that trains has: {fix}")
    if passed:
        values = ", ".join(f"{name}={show_value(combo[name])}" for name in searched)
        return "base", space.base, f"{rule} with {values} together, each of which trains in another combination: {fix}"
    return "base", space.base, f"{rule} in every combination of knob values tried, so no knob explains it: {fix}"


def _root_cause(error: BaseException) -> str:
    cause = root_cause(error)
    return f"{type(cause).__name__}: {cause}"


def _build_on_meta(cfg: Config) -> Any:
    """Constructs the detector of ``cfg`` without allocating its weights."""
    from mmdet.registry import MODELS

    with DefaultScope.overwrite_default_scope("mmdet"), meta_device():
        model = MODELS.build(copy.deepcopy(cfg.model))  # some detectors (DETR) write into the dict they are built from
    return model.to("meta")  # a parameter made with the legacy torch.Tensor(n) (SSD's L2Norm) is on the CPU


# ---------------------------------------------------------------------------------------------------------
# Summary.


def _notes(space: Space) -> Iterator[str]:
    """Things worth knowing before a search that are not errors."""
    _, backbones = _knob_values(space, "backbone")
    scratch = [name for name in backbones if name not in space.pretrained]
    if scratch:
        yield (f"no pretrained checkpoint for {', '.join(map(str, scratch))}: trains from scratch "
               "(add pretrained: {name: /path/to/imagenet.pth})")
    _, depths = _knob_values(space, "freeze")
    if scratch and any(depth >= 0 for depth in depths):
        yield "freeze >= 0 without a pretrained checkpoint freezes randomly initialised stages"
    grid = space.grid_size()
    if space.search.algorithm == "grid" and grid is not None and space.budget.trials != grid:
        yield f"budget.trials ({space.budget.trials}) is unused: grid search trains each of its {grid} points once"


def summary(validation: Validation) -> str:
    """Returns a one-screen description of a valid space: knobs, budget, search, resources, models built."""
    space, dataset = validation.space, validation.dataset
    rows = [
        ("base", space.base),
        ("data", _data_line(space.data, dataset)),
        *_labelled("", validation.data_check.card_lines() if validation.data_check else []),
        *_labelled("warning", validation.data_check.problem_lines() if validation.data_check else []),
        *_labelled("on_bad", [f"skip: {validation.cleaned.summary()}; the search trains on a cleaned copy of the "
                              "annotations in its storage"] if validation.cleaned else []),
        ("metric", f"{space.metric} ({space.mode})"),
        *_labelled("objectives", [f"{o.metric} ({o.mode})" for o in space.objectives]),
        *_labelled("limits", [_limit_line(metric, limit) for metric, limit in space.constraints.items()]),
        *_labelled("space", [_knob_line(name, dist, _width(space)) for name, dist in space.space.items()]),
        ("fixed", "  ".join(f"{name}={show_value(value)}" for name, value in space.point_defaults().items())),
        ("grid", _grid_line(space)),
        ("trials", _trials_line(space)),
        ("search", _search_line(space)),
        ("scheduler", _scheduler_line(space)),
        ("resources", _resources_line(space)),
        ("models", f"{_count(validation.models, 'model variant')} built on the meta device from "
                   f"{_count(validation.combinations, 'knob combination')}"),
        ("training", f"{_count(validation.trained, '(model, pipeline) combination')} ran a trial's first step "
                     f"on the CPU (a Runner: one training iteration, one validation pass) in "
                     f"{validation.train_seconds:.1f} s"),
        *_labelled("note", list(validation.notes)),
    ]
    lines = [f"{validation.file}: valid space {space.name!r}"]
    lines += [f"  {label:<10} {text}" for label, text in rows]
    return "\n".join(lines)


def _labelled(label: str, texts: list[str]) -> list[tuple[str, str]]:
    """Rows for a multi-line entry: the label on the first line only."""
    return [(label if index == 0 else "", text) for index, text in enumerate(texts)]


def _width(space: Space) -> int:
    return max((len(name) for name in space.space), default=0)


def _data_line(spec: DataSpec, dataset: Dataset) -> str:
    areas = " ".join(word for code, word in (("s", "small"), ("m", "medium"), ("l", "large"))
                     if code in dataset.val_area_ranges)
    masks = "with masks" if dataset.has_masks else "boxes only"
    return (f"{spec.root} ({spec.train}, {spec.val}): {dataset.num_train_images} train images, "
            f"{len(dataset.classes)} classes, {masks}; val objects: {areas}")


def _knob_line(name: str, dist: Distribution, width: int) -> str:
    if isinstance(dist, Choice | Grid):
        values = ", ".join(show_value(value) for value in dist.values)
        return f"{name:<{width}}  {dist.kind} ({len(dist.values)}): {values}"
    if isinstance(dist, RandInt):
        return f"{name:<{width}}  randint: {dist.low} .. {dist.high - 1}"
    assert isinstance(dist, Uniform | LogUniform | QUniform)
    step = f" step {dist.q:g}" if isinstance(dist, QUniform) else ""
    return f"{name:<{width}}  {dist.kind}: {dist.low:g} .. {dist.high:g}{step}"


def _grid_line(space: Space) -> str:
    size = space.grid_size()
    if size is not None:
        return _count(size, "point")
    continuous = [name for name, dist in space.space.items() if not isinstance(dist, Choice | Grid)]
    return f"none: {', '.join(continuous)} {'is' if len(continuous) == 1 else 'are'} continuous"


def _trials_line(space: Space) -> str:
    epochs = f"up to {space.budget.epochs} epochs each"
    if space.budget.hours is not None:
        epochs += f", within {space.budget.hours:g} h"
    if space.search.algorithm == "grid":
        return f"{space.grid_size()}, one per grid point, {epochs}"
    return f"{space.budget.trials}, {epochs}"


def _search_line(space: Space) -> str:
    name = {"tpe": "Optuna TPE", "nsga2": "Optuna NSGA-II", "random": "random sampling",
            "grid": "grid search"}[space.search.algorithm]
    steers = [metric for metric, _ in space.directions()] if space.search.uses_optuna else []
    towards = f" towards {' and '.join(steers)}" if len(steers) > 1 else ""
    limits = ", within the limits" if space.constraints and space.search.uses_optuna else ""
    return f"{name}{towards}{limits}, seed {space.search.seed}"


def _limit_line(metric: str, limit: Limit) -> str:
    return f"{metric} {limit.text()}: a trial outside it is never the best"


def _scheduler_line(space: Space) -> str:
    scheduler = space.scheduler
    if scheduler.type == "none":
        return "none: every trial trains all epochs"
    primary = f" by {space.metric}, the primary metric" if space.objectives else ""
    return (f"ASHA: first rung after {_count(scheduler.grace_epochs, 'epoch')}, keeps 1/"
            f"{scheduler.reduction_factor} of the trials at each rung{primary}")


def _resources_line(space: Space) -> str:
    budget = space.budget
    gpus, cpus = budget.gpus_per_trial, budget.workers_per_trial * budget.cpus_per_worker
    peak = budget.max_concurrent
    per_trial = f"{_count(budget.workers_per_trial, 'worker')}, {gpus:g} GPU, {cpus} CPU per trial"
    at_peak = f"up to {_count(peak, 'trial')} at once: {gpus * peak:g} GPU, {cpus * peak} CPU"
    retries = f"{_count(budget.max_retries, 'retry', 'retries')} of a failed trial"
    return f"{per_trial}; {at_peak}; {retries}"


def _count(number: int, one: str, many: str | None = None) -> str:
    """``"1 epoch"``, ``"3 epochs"``."""
    return f"{number} {one if number == 1 else many or one + 's'}"


__all__ = ["AREA_METRICS", "Validation", "check_file", "check_space", "combinations", "summary"]
