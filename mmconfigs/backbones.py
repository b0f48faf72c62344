"""Backbone catalog: each name maps to a full mmdet backbone dict and the channels it feeds the neck.

Widths follow the published architectures; ``tiny`` narrows them (same depth, a quarter or less of
the channels) so that CPU tests and demos train in seconds.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import importlib.machinery
import sys
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
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
# Config keys that tell the catalog's backbones apart; used to recognise a base config's backbone.
_IDENTITY = {"ResNet": ("depth",), "ResNeXt": ("depth", "groups", "base_width"),
             "SwinTransformer": ("embed_dims", "depths", "num_heads"), "mmpretrain.ConvNeXt": ("arch",)}


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
    # A quarter of the channels and an eighth of the groups keeps 64x4d twice as wide inside as 32x4d.
    cfg = dict(type="ResNeXt", depth=101, groups=groups // 8 if tiny else groups, base_width=base_width,
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


def family_of(cfg: Mapping[str, Any]) -> str | None:
    """The family of a backbone config found in a base config, or None when dettune doesn't know it."""
    kind = str(cfg.get("type", ""))
    if kind in ("ResNet", "ResNeXt", "ResNetV1d"):
        return "resnet"
    if kind == "SwinTransformer":
        return "swin"
    if kind.endswith("ConvNeXt"):
        return "convnext"
    return None


def catalog_name(cfg: Mapping[str, Any]) -> str | None:
    """The catalog name of a full-width backbone config (mmdet's ResNet-50 -> ``r50``), else None.

    Lets a base config's own backbone take its local checkpoint from ``pretrained`` like a chosen one.
    """
    kind = str(cfg.get("type", ""))
    if kind == "ConvNeXt" or kind.endswith(".ConvNeXt"):
        kind = "mmpretrain.ConvNeXt"
        if cfg.get("arch") == "tiny":  # mmdet's own ConvNeXt configs name the arch
            return "convnext-t"
    keys = _IDENTITY.get(kind)
    if keys is None:
        return None
    for name in _BUILDERS:
        ref = backbone(name).cfg
        if ref["type"] == kind and all(_plain(cfg.get(k)) == _plain(ref[k]) for k in keys):
            return name
    return None


def _plain(value: Any) -> Any:
    """Tuples and lists (and dicts of them) compare equal when their items do."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# --- mmpretrain without torchvision -----------------------------------------------------------------

def import_mmpretrain_models() -> None:
    """Imports ``mmpretrain.models`` so that ``mmpretrain.ConvNeXt`` can be built, even without torchvision.

    mmpretrain imports torchvision at module level, but only for code a detection backbone never runs
    (box IoU for visual grounding, its classification transforms). The pinned CPU torch 2.13 has no
    torchvision that imports beside it, so where ``import torchvision`` fails, placeholder modules stand in
    for the duration of that import only; anything that later calls into them raises ImportError.
    """
    if "mmpretrain.models" in sys.modules:
        return
    try:
        import torchvision  # noqa: F401
    except (ImportError, RuntimeError):  # RuntimeError: a torchvision built for another torch
        _forget_modules("torchvision")
        with _torchvision_placeholders():
            importlib.import_module("mmpretrain.models")
        return
    importlib.import_module("mmpretrain.models")


def _forget_modules(package: str) -> None:
    """Removes ``package`` and its submodules from the import cache."""
    for name in [n for n in sys.modules if n == package or n.startswith(package + ".")]:
        del sys.modules[name]


class _Unavailable(type):
    """Any torchvision name: attributes resolve and it can be subclassed, but calling it raises."""

    def __getattr__(cls, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _unavailable(f"{cls.__qualname__}.{name}")

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        raise ImportError(f"{cls.__qualname__} needs torchvision, which cannot be imported here")


def _unavailable(qualname: str) -> Any:
    """A placeholder class named like the torchvision object it stands for."""
    return _Unavailable(qualname.rsplit(".", 1)[-1], (), {"__qualname__": qualname})


class _PlaceholderModule(types.ModuleType):
    """A torchvision module whose every public name is a placeholder."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _unavailable(f"{self.__name__}.{name}")


class _PlaceholderFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers every ``torchvision[.*]`` import with a placeholder module."""

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None = None
                  ) -> importlib.machinery.ModuleSpec | None:
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = _PlaceholderModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        return None


@contextlib.contextmanager
def _torchvision_placeholders() -> Iterator[None]:
    """Placeholder torchvision modules for the imports made inside the block, and only those."""
    finder = _PlaceholderFinder()
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)
        # Later ``import torchvision`` elsewhere must fail as before, not find a placeholder.
        _forget_modules("torchvision")
