"""A COCO-format dataset as a space refers to it: paths, classes, and whether it carries masks."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spaces.errors import UserError


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
    train_doc = _load_coco(root / train)
    val_doc = _load_coco(root / val)
    classes = _classes(root / train, train_doc)
    if _classes(root / val, val_doc) != classes:
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
    """COCO's area ranges: small < 32², medium < 96², large beyond (by the annotation's ``area``)."""
    def kind(area: float) -> str:
        return "s" if area < 32**2 else "m" if area < 96**2 else "l"

    return frozenset(kind(float(a.get("area", 0.0))) for a in doc["annotations"] if not a.get("iscrowd"))


def _load_coco(path: Path) -> dict[str, Any]:
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
    return doc


def _classes(path: Path, doc: dict[str, Any]) -> tuple[str, ...]:
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
