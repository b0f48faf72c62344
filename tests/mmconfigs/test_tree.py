"""Walking configs: dropping init_cfg entries wherever they sit."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mmengine.config import ConfigDict

from mmconfigs.tree import drop_init_cfgs


def _is_pretrained(init: Mapping[str, Any]) -> bool:
    return init.get("type") == "Pretrained"


def test_drop_init_cfgs_removes_matches_at_any_depth_and_keeps_the_rest() -> None:
    pretrained = dict(type="Pretrained", checkpoint="r50.pth")
    normal = dict(type="Normal", layer="Conv2d", std=0.01)
    model = ConfigDict(
        backbone=dict(init_cfg=dict(pretrained)),
        roi_head=dict(bbox_head=[dict(init_cfg=[dict(normal), dict(pretrained)]), dict(init_cfg=dict(normal))]),
        neck=dict(init_cfg=None),
    )

    removed = drop_init_cfgs(model, _is_pretrained)

    assert [dict(init) for init in removed] == [pretrained, pretrained]
    assert model.backbone.init_cfg is None  # a single entry: mmengine's "no init"
    assert model.roi_head.bbox_head[0].init_cfg == [normal]  # a list keeps its other entries
    assert model.roi_head.bbox_head[1].init_cfg == normal
    assert model.neck.init_cfg is None


def test_drop_init_cfgs_leaves_a_model_without_matches_unchanged() -> None:
    model = ConfigDict(backbone=dict(init_cfg=[dict(type="Kaiming", layer="Conv2d")]))
    before = model.to_dict()

    assert drop_init_cfgs(model, _is_pretrained) == []
    assert model.to_dict() == before
