"""A COCO-format dataset as a space refers to it: paths, classes, and whether it carries masks."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spaces.errors import UserError

SMALL_MAX = 32.0**2
LARGE_MIN = 96.0**2
"""COCO's area ranges (pycocotools' ``areaRng``): small below 32², medium below 96², large from there on."""
AREA_RANGES = ("small", "medium", "large")


def area_range(area: float) -> str:
    """The COCO area range (one of :data:`AREA_RANGES`) of an object of this area."""
    if area < SMALL_MAX:
        return "small"
    return "medium" if area < LARGE_MIN else "large"


class DatasetError(UserError, ValueError):
    """A dataset that cannot be trained on; the message names the file, the problem and the fix."""


@dataclass(frozen=True, kw_only=True)
class Dataset:
    """A COCO dataset on disk, checked once when it is opened."""

    root: Path
    train: str
    val: str
    images: str
    classes: tuple[str, ...]
    has_masks: bool
    num_train_images: int
    val_area_ranges: frozenset[str]
    """COCO area ranges ('s', 'm', 'l') that hold at least one val object: the mAP columns that are defined."""

    @property
    def train_json(self) -> Path:
        return self.root / self.train

    @property
    def val_json(self) -> Path:
        return self.root / self.val


def open_dataset(root: str | Path, train: str, val: str, images: str = "images") -> Dataset:
    """Reads both annotation files, checks them and returns the dataset.

    Classes come from the train file's ``categories`` (sorted by id); the val file must use the same.

    Raises:
        DatasetError: on a missing path, corrupt JSON, a non-COCO file, no categories, no annotations,
            an annotation of an unlisted category, an image file that is missing, or class lists that differ.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} does not exist: fix data.root (for a synthetic demo dataset "
                           f"there, run `dettune data synth {root}`)")
    train_doc = load_coco(root / train)
    val_doc = load_coco(root / val)
    classes = classes_of(root / train, train_doc)
    if classes_of(root / val, val_doc) != classes:
        raise DatasetError(f"{root / val}: its categories differ from {root / train}'s; "
                           "both files must list the same categories")
    for path, doc in ((root / train, train_doc), (root / val, val_doc)):
        _check_annotations(path, doc)
        _check_images_exist(path, doc, root / images)
    return Dataset(
        root=root, train=train, val=val, images=images, classes=classes,
        has_masks=all(ann.get("segmentation") for ann in train_doc["annotations"]),
        num_train_images=len(train_doc["images"]),
        val_area_ranges=_area_ranges(val_doc),
    )


def _area_ranges(doc: dict[str, Any]) -> frozenset[str]:
    """The area ranges' initials (by the annotation's ``area``), as the mAP metrics' suffixes name them."""
    return frozenset(area_range(float(a.get("area", 0.0)))[0] for a in doc["annotations"] if not a.get("iscrowd"))


def load_coco(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DatasetError(f"annotation file {path} does not exist: fix data.root / data.train / data.val")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path} is not valid JSON ({exc}): re-export the annotations") from None
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(doc, dict) or k not in doc]
    if missing:
        raise DatasetError(f"{path} is not a COCO annotation file: it lacks {missing}; "
                           "a COCO file has 'images', 'annotations' and 'categories' lists")
    malformed = list(_malformed(doc))
    if malformed:
        shown = "; ".join(malformed[:5]) + (f"; and {len(malformed) - 5} more" if len(malformed) > 5 else "")
        raise DatasetError(f"{path} is not valid COCO: {shown}; re-export the annotations (each image needs an "
                           "integer id, a file_name and positive integer width/height; each annotation an integer "
                           "id, image_id and category_id and a bbox of 4 numbers; each category an id and a name)")
    return doc


_FIELDS: dict[str, dict[str, tuple[type, ...]]] = {
    "images": {"id": (int,), "file_name": (str,), "width": (int,), "height": (int,)},
    "annotations": {"id": (int,), "image_id": (int,), "category_id": (int,), "bbox": (list,)},
    "categories": {"id": (int,), "name": (str,)},
}
"""The fields of each COCO list that dettune and mmdet read, and their JSON types."""


def _malformed(doc: dict[str, Any]) -> Iterator[str]:
    """Each missing or mistyped field, as ``annotations[3].bbox: ...``: what would otherwise be a traceback."""
    for section, fields in _FIELDS.items():
        items = doc[section]
        if not isinstance(items, list):
            yield f"'{section}' is a {type(items).__name__}, not a list"
            continue
        for index, item in enumerate(items):
            if not isinstance(item, dict):
                yield f"{section}[{index}] is a {type(item).__name__}, not an object"
                continue
            for name, types in fields.items():
                value = item.get(name)
                if name not in item:
                    yield f"{section}[{index}].{name} is missing"
                elif not isinstance(value, types) or isinstance(value, bool):
                    yield f"{section}[{index}].{name} = {value!r} is not {_TYPE_WORDS[types[0]]}"
            bbox = item.get("bbox")
            if section == "annotations" and isinstance(bbox, list) and not _four_numbers(bbox):
                yield f"{section}[{index}].bbox = {bbox!r} is not 4 numbers [x, y, width, height]"


_TYPE_WORDS = {int: "an integer", str: "a string", list: "a list"}


def _four_numbers(bbox: list[Any]) -> bool:
    return len(bbox) == 4 and all(isinstance(v, int | float) and not isinstance(v, bool) for v in bbox)


def classes_of(path: Path, doc: dict[str, Any]) -> tuple[str, ...]:
    if not doc["categories"]:
        raise DatasetError(f"{path} lists no categories: add the class list under 'categories'")
    return tuple(c["name"] for c in sorted(doc["categories"], key=lambda c: c["id"]))


def _check_annotations(path: Path, doc: dict[str, Any]) -> None:
    if not doc["annotations"]:
        raise DatasetError(f"{path} has zero annotations: a detector cannot learn from it; annotate some "
                           "objects, or point data.train / data.val at an annotated file")
    known = {c["id"] for c in doc["categories"]}
    stray = sorted({a["category_id"] for a in doc["annotations"]} - known)
    if stray:
        raise DatasetError(f"{path}: annotations use category ids {stray} that 'categories' does not list; "
                           "add those categories or drop the annotations")


def _check_images_exist(path: Path, doc: dict[str, Any], image_dir: Path) -> None:
    missing = [img["file_name"] for img in doc["images"] if not (image_dir / img["file_name"]).is_file()]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise DatasetError(f"{path} references {len(missing)} image(s) missing from {image_dir}: {shown}; "
                           "fix data.images or copy the images")
