"""What the knobs need to know about detector families beyond the R-CNNs: DETRs and RTMDet.

- A swapped backbone must feed the neck the same strides the base's did: DETR's ``ChannelMapper`` takes
  stride 32 only, Deformable DETR and DINO strides 8-32, RTMDet's ``CSPNeXtPAFPN`` strides 8-32. Feeding
  them every level of a new backbone adds a stride-4 level, which costs more than the rest of the model.
- Image sizes live beyond ``Resize``: mosaic and mix-up canvases, crops and pads, and the second-stage
  pipeline RTMDet's ``PipelineSwitchHook`` switches to.
- Epoch-based hooks (RTMDet's pipeline switch, an EMA that begins at an epoch) follow the trial's epochs.
- A base's ``paramwise_cfg`` (DETRs: backbone at a tenth of the lr; RTMDet: no decay on norms and biases)
  survives an optimiser change.
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from mmconfigs.tree import as_list, config_dicts

if TYPE_CHECKING:
    from mmengine.config import Config

_STEM_IS_INDEX_0 = ("CSPNeXt", "CSPDarknet")
"""Backbones whose out index 0 is the stride-2 stem, so index i has stride 2**(i+1); others: 2**(i+2)."""

SIZE_KEYS = {
    "Mosaic": "img_scale", "CachedMosaic": "img_scale", "MixUp": "img_scale", "CachedMixUp": "img_scale",
    "RandomCrop": "crop_size", "Pad": "size", "RandomResize": "scale",
}
"""Pipeline steps that carry an image size relative to the test scale (a mosaic canvas is twice it, say)."""


def out_strides(backbone: Mapping[str, Any]) -> list[int] | None:
    """The strides of the levels a base backbone hands its neck, or None if it doesn't say which."""
    indices = backbone.get("out_indices", class_default(str(backbone.get("type")), "out_indices"))
    if indices is None:
        return None
    first = 1 if str(backbone.get("type")) in _STEM_IS_INDEX_0 else 2
    return [2 ** (int(index) + first) for index in indices]


def stage_indices(strides: Sequence[int]) -> list[int] | None:
    """The out indices of a four-stage catalog backbone (stage i at stride 4 * 2**i) giving ``strides``;
    None if some stride is not one of its stages'."""
    indices = [int(math.log2(stride)) - 2 for stride in strides]
    return indices if all(0 <= index <= 3 and 4 * 2**index == stride for index, stride in zip(
        indices, strides, strict=True)) else None


def scale_sizes(cfg: Config, factor: tuple[float, float]) -> None:
    """Multiplies every :data:`SIZE_KEYS` size in the config (pipelines, wrappers, hooks) by ``factor``."""
    for node in config_dicts(cfg):
        key = SIZE_KEYS.get(str(node.get("type")))
        if key is not None and is_pair(node.get(key)):
            width, height = node[key]
            node[key] = (max(1, round(width * factor[0])), max(1, round(height * factor[1])))


def scale_epoch_hooks(cfg: Config, base_epochs: int, epochs: int) -> None:
    """Moves epoch-based hooks to the same fraction of ``epochs`` as of the base's ``base_epochs``.

    RTMDet switches to its second-stage pipeline for the last 20 of 300 epochs: in a 12-epoch trial, for
    the last one. An EMA that begins at an epoch moves the same way.
    """
    for hook in as_list(cfg.get("custom_hooks")):
        for key in ("switch_epoch", "begin_epoch"):
            if isinstance(hook.get(key), int) and hook[key] > 0:
                hook[key] = min(epochs, max(1, round(hook[key] * epochs / base_epochs)))


def merged_paramwise(base: Mapping[str, Any] | None, knob: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The base's ``paramwise_cfg`` with the optimiser knob's on top (its custom keys added, not replacing)."""
    if not base and not knob:
        return None
    merged = copy.deepcopy(dict(base or {}))
    for key, value in (knob or {}).items():
        if key == "custom_keys":
            merged["custom_keys"] = {**dict(merged.get("custom_keys") or {}), **copy.deepcopy(dict(value))}
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def narrow_group_norms(head: Any, groups: int) -> None:
    """Caps the GroupNorm groups of a head narrowed by the tiny preset, its class's default norm included.

    FCOS and ATSS heads normalise with 32 groups by default: at a tiny preset's 32 channels each group holds
    one channel, and on a 1x1 top level at batch 1 a single value, which GroupNorm refuses.
    """
    norm = head.get("norm_cfg", class_default(str(head.get("type")), "norm_cfg"))
    if isinstance(norm, Mapping) and norm.get("type") == "GN":
        head["norm_cfg"] = {**norm, "num_groups": min(int(norm.get("num_groups", groups)), groups)}


def class_default(type_name: str, argument: str) -> Any:
    """The default of ``argument`` in the registered mmdet class ``type_name``'s constructor, or None.

    A base config leaves out what the class defaults (RTMDet's CSPNeXt its ``out_indices``, FCOS its norm).
    """
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules

    register_all_modules(init_default_scope=False)
    cls = MODELS.get(type_name)
    parameter = inspect.signature(cls.__init__).parameters.get(argument) if cls is not None else None
    return None if parameter is None or parameter.default is inspect.Parameter.empty else parameter.default


def is_detr_family(model: Mapping[str, Any]) -> bool:
    """DETR-style detectors: a transformer encoder/decoder over a ``ChannelMapper`` neck, no RPN."""
    return "decoder" in model or str(model.get("type", "")).endswith("DETR") or model.get("type") == "DINO"


def is_pair(value: Any) -> bool:
    """Whether ``value`` is a size as mmdet configs write one: two ints, (width, height)."""
    return isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value)
