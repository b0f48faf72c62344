"""The model zoo: mmdet 3.x's own configs as ``base``, with the backbone and scale knobs (and the tiny preset
where it applies). ``validate`` passes or refuses with the intended message; a config it passes trains one
iteration and validates once."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import make_dataset

from cocodata.dataset import Dataset
from mmconfigs.validate import check_file
from spaces.errors import SpaceError
from trainers.smoke import first_step
from trainers.trial import TrialSpec, run_trial

SCALE = [128, 128]
DETR_FAMILY = {"backbone": "r18", "scale": SCALE}  # the tiny preset narrows R-CNN and one-stage heads only
ONE_STAGE_OR_RCNN = {**DETR_FAMILY, "preset": "tiny"}
# DINO selects its 900 queries among the encoder's tokens, fewer than that at strides 8-64 of a 128 px image
# ("selected index k out of range"): on images this small a user asks for fewer queries, as here.
OVERRIDES: dict[str, dict[str, Any]] = {"dino-4scale": {"model.num_queries": 100}}

# name: (mmdet config, fixed knobs, the refusal validate must give, or None where it trains)
ZOO: dict[str, tuple[str, dict[str, Any], str | None]] = {
    "faster-rcnn": ("faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py", ONE_STAGE_OR_RCNN, None),
    "cascade-rcnn": ("cascade_rcnn/cascade-rcnn_r50_fpn_1x_coco.py", ONE_STAGE_OR_RCNN, None),
    "htc": ("htc/htc_r50_fpn_1x_coco.py", ONE_STAGE_OR_RCNN, "use base mmdet::htc/htc-without-semantic"),
    "mask-rcnn": ("mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py", ONE_STAGE_OR_RCNN, None),
    "retinanet": ("retinanet/retinanet_r50_fpn_1x_coco.py", ONE_STAGE_OR_RCNN, None),
    "fcos": ("fcos/fcos_r50-caffe_fpn_gn-head_1x_coco.py", ONE_STAGE_OR_RCNN, None),
    "rtmdet-tiny": ("rtmdet/rtmdet_tiny_8xb32-300e_coco.py", ONE_STAGE_OR_RCNN, None),
    "detr": ("detr/detr_r50_8xb2-150e_coco.py", DETR_FAMILY, None),
    "deformable-detr": ("deformable_detr/deformable-detr_r50_16xb2-50e_coco.py", DETR_FAMILY, None),
    "dino-4scale": ("dino/dino-4scale_r50_8xb2-12e_coco.py", DETR_FAMILY, None),
    "swin-t-mask-rcnn": ("swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py", {**ONE_STAGE_OR_RCNN, "backbone": "swin-t"},
                         None),
    # TOOD's head reads the epoch its config's SetEpochInfoHook sets; YOLOX batches through MultiImageMixDataset
    # and its batch augment: validate's step is a Runner's, so both train as their trials do.
    # (Not tiny: a group norm of its narrowed head then has one value per group on the 1 px level of a val image.)
    "tood": ("tood/tood_r50_fpn_1x_coco.py", {"backbone": "r18", "scale": SCALE}, None),
    "yolox-tiny": ("yolox/yolox_tiny_8xb8-300e_coco.py", {"scale": SCALE}, None),
    # SSD300's extra layers shrink a 128 px image's features below their 3x3 kernels: the scale is at fault.
    "ssd300": ("ssd/ssd300_coco.py", {"scale": SCALE}, "fixed.scale = [128, 128]: the model's feature maps vanish"),
    "solov2": ("solov2/solov2_r50_fpn_1x_coco.py", {"scale": SCALE}, "the base model SOLOv2 has no bbox head"),
}
# Knobs that do not apply to a family: (mmdet config, fixed knobs, the refusal)
MISFITS: dict[str, tuple[str, dict[str, Any], str]] = {
    "roi_head-on-retinanet": ("retinanet/retinanet_r50_fpn_1x_coco.py", {**ONE_STAGE_OR_RCNN, "roi_head": "cascade"},
                              "roi_head needs a two-stage base config, but the base model is RetinaNet"),
    "roi_head-on-dino": ("dino/dino-4scale_r50_8xb2-12e_coco.py", {**DETR_FAMILY, "roi_head": "faster"},
                         "roi_head needs a two-stage base config, but the base model is DINO"),
    "freeze-on-cspnext": ("rtmdet/rtmdet_tiny_8xb32-300e_coco.py", {"scale": SCALE, "freeze": 1},
                          "does not know how to freeze a CSPNeXt backbone"),
    "tiny-on-detr": ("detr/detr_r50_8xb2-150e_coco.py", {**DETR_FAMILY, "preset": "tiny"},
                     "preset 'tiny' narrows the necks and heads of R-CNN and one-stage detectors"),
}


@pytest.fixture(scope="module")
def zoo_data(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    """5 images: 4 to train on (one iteration of batch 4), 1 to validate on (DETRs predict slowly on a CPU)."""
    dataset = make_dataset(tmp_path_factory, 5)
    assert dataset.num_train_images == 4
    return dataset


def _space(path: Path, dataset: Dataset, base: str, fixed: dict[str, Any],
           overrides: dict[str, Any] | None = None) -> Path:
    doc = {"name": "zoo", "base": f"mmdet::{base}",
           "data": {"root": str(dataset.root), "train": dataset.train, "val": dataset.val},
           "metric": "val/bbox_mAP", "budget": {"epochs": 1, "trials": 1}, "scheduler": {"type": "none"},
           "space": {"lr": {"loguniform": [1.0e-4, 1.0e-3]}},
           "fixed": {**fixed, "batch_size": dataset.num_train_images, "optimizer": "adamw"},
           "overrides": overrides or {}}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.mark.parametrize("name", list(ZOO))
def test_a_zoo_config_validates_and_trains_or_is_refused(name: str, zoo_data: Dataset, tmp_path: Path) -> None:
    base, fixed, refusal = ZOO[name]
    space_file = _space(tmp_path / "space.yaml", zoo_data, base, fixed, OVERRIDES.get(name))
    started = time.perf_counter()
    if refusal is not None:
        with pytest.raises(SpaceError) as refused:
            check_file(space_file, first_step=first_step)
        assert refusal in str(refused.value)
        return
    validation = check_file(space_file, first_step=first_step)
    assert validation.trained == 1
    validated = time.perf_counter()

    point = {**validation.space.point_defaults(), "lr": 1.0e-4}
    rows = run_trial(TrialSpec(base=f"mmdet::{base}", dataset=zoo_data, point=point, work_dir=tmp_path / "trial",
                               overrides=validation.space.overrides))

    # batch_size is the number of train images: the one epoch is one iteration.
    assert [row["epoch"] for row in rows] == [1.0], "trained one epoch and validated once"
    assert math.isfinite(rows[0]["train/loss"]) and 0.0 <= rows[0]["val/bbox_mAP"] <= 1.0
    print(f"{name}: validate {validated - started:.1f} s, train + validate {time.perf_counter() - validated:.1f} s")


@pytest.mark.parametrize("name", list(MISFITS))
def test_a_knob_that_does_not_apply_to_the_family_is_refused(name: str, zoo_data: Dataset, tmp_path: Path) -> None:
    base, fixed, refusal = MISFITS[name]
    with pytest.raises(SpaceError) as refused:
        check_file(_space(tmp_path / "space.yaml", zoo_data, base, fixed), first_step=first_step)
    assert refusal in str(refused.value)
