"""Backbone catalog: each name maps to a full mmdet backbone dict and the channels it feeds the neck.

Widths follow the published architectures; ``tiny`` narrows them (same depth, a quarter or less of
the channels) so that CPU tests and demos train in seconds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

_RESNET = {"r18": (18, 1), "r34": (34, 1), "r50": (50, 4), "r101": (101, 4)}
_RESNEXT = {"x101-32x4d": (32, 4), "x101-64x4d": (64, 4)}
_SWIN = {
    "swin-t": (96, (2, 2, 6, 2), (3, 6, 12, 24)),
    "swin-s": (96, (2, 2, 18, 2), (3, 6, 12, 24)),
    "swin-b": (128, (2, 2, 18, 2), (4, 8, 16, 32)),
}
_CONVNEXT_T = ((3, 3, 9, 3), (96, 192, 384, 768))


@dataclass(frozen=True)
class Backbone:
    """A backbone config and the per-level channels its four outputs carry."""

    cfg: dict[str, Any]
    out_channels: list[int]
    family: str  # resnet | swin | convnext — decides how freeze depth is expressed


def _resnet(name: str, tiny: bool) -> Backbone:
    depth, expansion = _RESNET[name]
    base = 16 if tiny else 64
    cfg = dict(type="ResNet", depth=depth, num_stages=4, out_indices=(0, 1, 2, 3), frozen_stages=-1,
               base_channels=base, norm_cfg=dict(type="BN", requires_grad=True), norm_eval=False,
               style="pytorch")
    return Backbone(cfg, [base * expansion * 2**i for i in range(4)], "resnet")


def _resnext(name: str, tiny: bool) -> Backbone:
    groups, base_width = _RESNEXT[name]
    base = 16 if tiny else 64
    cfg = dict(type="ResNeXt", depth=101, groups=4 if tiny else groups, base_width=base_width,
               num_stages=4, out_indices=(0, 1, 2, 3), frozen_stages=-1, base_channels=base,
               norm_cfg=dict(type="BN", requires_grad=True), norm_eval=False, style="pytorch")
    return Backbone(cfg, [base * 4 * 2**i for i in range(4)], "resnet")


def _swin(name: str, tiny: bool) -> Backbone:
    embed, depths, heads = _SWIN[name]
    if tiny:
        embed, heads = 16, (1, 2, 4, 8)
    cfg = dict(type="SwinTransformer", embed_dims=embed, depths=depths, num_heads=heads, window_size=7,
               mlp_ratio=4, qkv_bias=True, qk_scale=None, drop_rate=0.0, attn_drop_rate=0.0,
               drop_path_rate=0.2, patch_norm=True, out_indices=(0, 1, 2, 3), with_cp=False,
               convert_weights=True, frozen_stages=-1)
    return Backbone(cfg, [embed * 2**i for i in range(4)], "swin")


def _convnext(name: str, tiny: bool) -> Backbone:
    depths, channels = _CONVNEXT_T
    if tiny:
        channels = (16, 32, 64, 128)
    cfg = dict(type="mmpretrain.ConvNeXt", arch=dict(depths=list(depths), channels=list(channels)),
               out_indices=[0, 1, 2, 3], drop_path_rate=0.4, layer_scale_init_value=1.0,
               gap_before_final_norm=False, frozen_stages=0)
    return Backbone(cfg, list(channels), "convnext")


_BUILDERS: dict[str, Callable[[str, bool], Backbone]] = {
    **{k: _resnet for k in _RESNET},
    **{k: _resnext for k in _RESNEXT},
    **{k: _swin for k in _SWIN},
    "convnext-t": _convnext,
}


def backbone(name: str, *, tiny: bool = False) -> Backbone:
    """Returns the backbone named ``name`` (one of :data:`spaces.knobs.BACKBONES`), from scratch."""
    return _BUILDERS[name](name, tiny)


def family_of(cfg: dict[str, Any]) -> str | None:
    """The family of a backbone config found in a base config, or None when dettune doesn't know it."""
    kind = str(cfg.get("type", ""))
    if kind in ("ResNet", "ResNeXt", "ResNetV1d"):
        return "resnet"
    if kind == "SwinTransformer":
        return "swin"
    if kind.endswith("ConvNeXt"):
        return "convnext"
    return None
