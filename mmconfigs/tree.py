"""Walking a config as what it is underneath: nested dicts (``ConfigDict`` included) and lists."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any


def dicts(node: Any) -> list[Any]:
    """Every mapping nested anywhere in ``node`` (lists included), outermost first."""
    return list(_iter_dicts(node))


def config_dicts(cfg: Any) -> list[Any]:
    """Every mapping nested in an mmengine ``Config``, reached through its keys (the Config itself is no Mapping)."""
    return [node for key in cfg for node in dicts(cfg[key])]


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


def as_list(node: Any) -> list[Any]:
    """``node`` as a list: None is empty, a single item is a list of one."""
    if node is None:
        return []
    return list(node) if isinstance(node, (list, tuple)) else [node]


def drop_init_cfgs(model: Any, drop: Callable[[Mapping[str, Any]], bool]) -> list[Mapping[str, Any]]:
    """Removes, anywhere in ``model``, every ``init_cfg`` entry for which ``drop`` holds; returns the removed ones.

    A list keeps its other entries; a single removed entry leaves ``init_cfg=None`` (mmengine's "no init").
    """
    removed: list[Mapping[str, Any]] = []
    for node in dicts(model):
        init = node.get("init_cfg")
        inits = as_list(init)
        dropped = [i for i in inits if isinstance(i, Mapping) and drop(i)]
        if dropped:
            removed += dropped
            node["init_cfg"] = [i for i in inits if i not in dropped] if isinstance(init, (list, tuple)) else None
    return removed
