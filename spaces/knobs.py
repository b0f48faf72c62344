"""The knob catalog: every hyperparameter a space may search or fix, and the values it accepts.

Each knob knows how to check a value (``Knob.check``); how a value turns into MMDetection config
edits lives in :mod:`mmconfigs.build`; :func:`show_value` is how every command shows a value.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

BACKBONES = (
    "r18", "r34", "r50", "r101", "x101-32x4d", "x101-64x4d",
    "swin-t", "swin-s", "swin-b", "convnext-t",
)
ROI_HEADS = ("faster", "cascade", "htc")
SCHEDULES = ("step", "cosine")
OPTIMIZERS = ("sgd", "adamw")
PRESETS = ("full", "tiny")
PRECISIONS = ("fp32", "fp16", "bf16")
FREEZE_DEPTHS = (-1, 0, 1, 2, 3, 4)


def _one_of(values: tuple[Any, ...]) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if value in values:
            return None
        return f"must be one of {list(values)}"

    return check


def _positive(kind: type) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"must be a number, got {type(value).__name__}"
        if kind is int and not float(value).is_integer():
            return "must be a whole number"
        if value <= 0:
            return "must be > 0"
        return None

    return check


def _check_scale(value: Any) -> str | None:
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        return "must be [width, height] in pixels, e.g. [800, 800]"
    if not all(32 <= v <= 4096 for v in value):
        return "width and height must be between 32 and 4096 pixels"
    return None


@dataclass(frozen=True, kw_only=True)
class Knob:
    """One hyperparameter: its name, what it means, and the rule its values follow."""

    name: str
    doc: str
    check: Callable[[Any], str | None]
    """Returns None for a valid value, else the rule the value breaks."""
    categorical: bool


KNOBS: dict[str, Knob] = {
    k.name: k
    for k in (
        Knob(name="backbone", categorical=True, check=_one_of(BACKBONES),
             doc="ResNet (r18..r101), ResNeXt (x101-*), Swin (swin-t/s/b) or ConvNeXt-T backbone"),
        Knob(name="roi_head", categorical=True, check=_one_of(ROI_HEADS),
             doc="faster: one bbox stage; cascade: three stages; htc: hybrid task cascade (needs masks)"),
        Knob(name="scale", categorical=True, check=_check_scale,
             doc="train and test Resize scale [width, height]"),
        Knob(name="lr", categorical=False, check=_positive(float), doc="initial learning rate"),
        Knob(name="schedule", categorical=True, check=_one_of(SCHEDULES),
             doc="step: x0.1 at ~2/3 and ~11/12 of the epochs; cosine: annealing to 0; both warm up"),
        Knob(name="optimizer", categorical=True, check=_one_of(OPTIMIZERS),
             doc="sgd (momentum 0.9, wd 1e-4) or adamw (wd 0.05, mmdet's Swin paramwise settings)"),
        Knob(name="freeze", categorical=True, check=_one_of(FREEZE_DEPTHS),
             doc="backbone frozen_stages: -1 trains all, 0 freezes the stem, k also stages 1..k"),
        Knob(name="epochs", categorical=False, check=_positive(int), doc="training epochs"),
        Knob(name="batch_size", categorical=False, check=_positive(int), doc="images per GPU/worker"),
        Knob(name="preset", categorical=True, check=_one_of(PRESETS),
             doc="full: the base config's widths; tiny: narrow neck and heads for CPU tests and demos"),
        Knob(name="amp", categorical=True, check=_one_of(PRECISIONS),
             doc="training precision: fp32, or fp16 / bf16 autocast (mmengine's AmpOptimWrapper, GPUs only)"),
    )
}


def param_text(value: Any) -> str:
    """A knob value as an MLflow param and wherever params are compared: ``[800, 800]`` -> ``800x800``."""
    return "x".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)


def show_value(value: Any) -> str:
    """A knob value as the console, the tables, the report and the messages show it.

    Floats keep three significant digits (an integral one its ``.0``: ``2.0`` stays a float); lists and numbers
    read as in the space file. A param read back from MLflow (text) shows as the value it was logged from.
    """
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return value  # a name, or a size logged as 800x800
        return value if value.lstrip("-").isdigit() else show_value(number)
    if isinstance(value, float):
        return repr(value) if value.is_integer() else f"{value:.3g}"
    return json.dumps(value)
