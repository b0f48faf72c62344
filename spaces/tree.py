"""Walking a config as what it is underneath: nested dicts (``ConfigDict`` included) and lists."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any


def dicts(node: Any) -> list[Any]:
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


def as_list(node: Any) -> list[Any]:
    """``node`` as a list: None is empty, a single item is a list of one."""
    if node is None:
        return []
    return list(node) if isinstance(node, (list, tuple)) else [node]
