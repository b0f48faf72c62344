"""Tests for the synthetic COCO dataset writer."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools.coco import COCO

from cocodata.synth import CLASSES, SynthSummary, write_dataset

SPLITS = ("train", "val")

# pycocotools' mask decoding trips numpy 2's __array__ copy-keyword DeprecationWarning on every call.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> SynthSummary:
    """One default-sized dataset shared by the read-only tests."""
    return write_dataset(tmp_path_factory.mktemp("synth"), seed=0)


@pytest.fixture(scope="module")
def cocos(dataset: SynthSummary) -> dict[str, COCO]:
    """The train and val annotation files loaded by pycocotools."""
    return {split: COCO(str(dataset.out / f"{split}.json")) for split in SPLITS}


def _tree_digest(root: Path) -> dict[str, str]:
    """Returns the SHA-256 of every file under ``root``, keyed by relative path."""
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def _polygon(ann: dict) -> np.ndarray:
    """Returns an annotation's single polygon as (n, 2) vertices."""
    assert len(ann["segmentation"]) == 1
    return np.asarray(ann["segmentation"][0], dtype=np.float64).reshape(-1, 2)


def _shoelace(polygon: np.ndarray) -> float:
    """Returns the area of a simple polygon."""
    x, y = polygon[:, 0], polygon[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)


def _area_range(area: float) -> str:
    """Returns the COCO area range of an annotation area."""
    if area < 32**2:
        return "small"
    return "medium" if area < 96**2 else "large"


def test_coco_files_load_and_reference_existing_images(dataset: SynthSummary, cocos: dict[str, COCO]) -> None:
    image_ids: set[int] = set()
    ann_ids: set[int] = set()
    for split, coco in cocos.items():
        ids = coco.getImgIds()
        assert ids
        assert image_ids.isdisjoint(ids)
        image_ids.update(ids)
        for info in coco.loadImgs(ids):
            path = dataset.out / "images" / info["file_name"]
            img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            assert img is not None, f"{split}: missing {path}"
            assert img.shape == (info["height"], info["width"], 3)
            anns = coco.loadAnns(coco.getAnnIds(imgIds=[info["id"]]))
            assert 2 <= len(anns) <= 6
            assert all(ann["image_id"] == info["id"] for ann in anns)
        anns = coco.dataset["annotations"]
        assert len(coco.getAnnIds()) == len(anns)
        assert ann_ids.isdisjoint(ann["id"] for ann in anns)
        ann_ids.update(ann["id"] for ann in anns)
        assert all(ann["iscrowd"] == 0 and 1 <= ann["category_id"] <= len(CLASSES) for ann in anns)
        cats = coco.loadCats(coco.getCatIds())
        assert [(c["id"], c["name"], c["supercategory"]) for c in cats] == [
            (i + 1, name, "trash") for i, name in enumerate(CLASSES)
        ]
    assert len(cocos["train"].getImgIds()) == dataset.train_images == 36
    assert len(cocos["val"].getImgIds()) == dataset.val_images == 12
    assert len(ann_ids) == dataset.annotations


def test_json_has_no_timestamps(dataset: SynthSummary) -> None:
    for split in SPLITS:
        doc = json.loads((dataset.out / f"{split}.json").read_text())
        assert set(doc) == {"info", "licenses", "categories", "images", "annotations"}
        assert not {"date_created", "year"} & set(doc["info"])


def test_same_seed_gives_identical_bytes(tmp_path: Path) -> None:
    first = _tree_digest(write_dataset(tmp_path / "a", images=8, seed=3).out)
    second = _tree_digest(write_dataset(tmp_path / "b", images=8, seed=3).out)
    other = _tree_digest(write_dataset(tmp_path / "c", images=8, seed=4).out)
    assert {"train.json", "val.json", "images/000001.png", "images/000008.png"} <= set(first)
    assert first == second
    assert set(other) == set(first)
    assert all(other[name] != first[name] for name in first)


def test_every_split_has_all_coco_area_ranges(dataset: SynthSummary, cocos: dict[str, COCO]) -> None:
    totals = {"small": 0, "medium": 0, "large": 0}
    for coco in cocos.values():
        ranges = [_area_range(ann["area"]) for ann in coco.dataset["annotations"]]
        assert set(ranges) == {"small", "medium", "large"}
        for name in totals:
            totals[name] += ranges.count(name)
    assert totals == dataset.area_counts
    assert totals["large"] < totals["medium"] and totals["large"] < totals["small"]


def test_boxes_and_areas_match_polygons(cocos: dict[str, COCO]) -> None:
    errors = []
    for coco in cocos.values():
        for ann in coco.dataset["annotations"]:
            polygon = _polygon(ann)
            (x0, y0), (x1, y1) = polygon.min(axis=0), polygon.max(axis=0)
            assert ann["bbox"] == pytest.approx([x0, y0, x1 - x0, y1 - y0], abs=1e-6)
            assert ann["area"] == pytest.approx(_shoelace(polygon), abs=0.01)
            info = coco.imgs[ann["image_id"]]
            assert x0 >= 0 and y0 >= 0 and x1 <= info["width"] and y1 <= info["height"]
            errors.append(abs(int(coco.annToMask(ann).sum()) - ann["area"]) / ann["area"])
    # COCO rasterisation samples pixel centres: small, thin shapes alias by a few percent at most.
    assert max(errors) < 0.08
    assert float(np.mean(errors)) < 0.01


def test_cv2_fill_poly_agrees_with_coco_mask(cocos: dict[str, COCO]) -> None:
    for coco in cocos.values():
        for ann in coco.dataset["annotations"]:
            info = coco.imgs[ann["image_id"]]
            filled = np.zeros((info["height"], info["width"]), np.uint8)
            # cv2 puts pixel centres on integers, COCO on half-integers; shift=4 keeps 1/16 px precision.
            points = np.round((_polygon(ann) - 0.5) * 16).astype(np.int32)
            cv2.fillPoly(filled, [points], 1, cv2.LINE_8, 4)
            coco_mask = coco.annToMask(ann).astype(bool)
            assert (filled.astype(bool) & coco_mask).sum() >= 0.97 * coco_mask.sum()
            if ann["area"] >= 32**2:  # cv2 also fills boundary pixels: a few percent on larger objects
                assert filled.sum() == pytest.approx(ann["area"], rel=0.12)


def test_polygons_do_not_overlap_and_match_visible_pixels(
    dataset: SynthSummary, cocos: dict[str, COCO]
) -> None:
    ring_kernel = np.ones((3, 3), np.uint8)
    for coco in cocos.values():
        for info in coco.loadImgs(coco.getImgIds()):
            masks = [coco.annToMask(ann) for ann in coco.loadAnns(coco.getAnnIds(imgIds=[info["id"]]))]
            union = np.sum(masks, axis=0)
            assert union.max() == 1, f"overlapping polygons in {info['file_name']}"
            img = cv2.imread(str(dataset.out / "images" / info["file_name"]))
            saturation = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)[..., 1]
            for mask in masks:
                inside = mask.astype(bool)
                ring = cv2.dilate(mask, ring_kernel).astype(bool) & (union == 0)
                # Objects are saturated, the background muted: the polygon is exactly the coloured pixels.
                assert np.mean(saturation[inside] >= 128) > 0.97
                assert np.mean(saturation[ring] < 128) > 0.9


def test_train_uses_every_category(cocos: dict[str, COCO]) -> None:
    used = {ann["category_id"] for ann in cocos["train"].dataset["annotations"]}
    assert used == set(range(1, len(CLASSES) + 1))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"images": 2}, "--images"),
        ({"size": 64}, "--size"),
        ({"size": 4096}, "--size"),
        ({"val_fraction": 0.0}, "--val-fraction"),
        ({"val_fraction": 1.0}, "--val-fraction"),
    ],
)
def test_bad_arguments_raise(tmp_path: Path, kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name) as error:
        write_dataset(tmp_path, **kwargs)
    assert str(next(iter(kwargs.values()))) in str(error.value)
    assert not (tmp_path / "train.json").exists()
