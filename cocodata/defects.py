"""Breaks a synthetic dataset the ways real annotation exports are broken: one defect per image, named.

:func:`apply_defect` puts one defect into a split of a clean dataset (written by :mod:`cocodata.synth`) and returns
the item it touched; :func:`write_defects` writes a dataset carrying every defect at once. Each defect is one
of three outcomes for a trial, which :data:`DEFECTS` records and the tests hold the check to:

- ``error``: mmdet fails on it, or trains on something other than what the JSON says (a truncated file, a box
  with no area, NaN coordinates, ids that collide): the check refuses the dataset;
- ``warning``: legal, but worth knowing (an image without objects, a class missing from val);
- ``fine``: mmdet's loader (``mmcv.imfrombytes`` with the default ``color_type='color'``) reads it as 8-bit,
  3-channel BGR at the JSON's size: grayscale, CMYK, 16-bit and RGBA images.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from cocodata.synth import write_dataset

Doc = dict[str, Any]
EXIF_ORIENTATION = 0x0112
ROTATED_90 = 6  # EXIF: the stored image is shown turned 90° clockwise, so width and height swap


def _read(root: Path, split: str) -> Doc:
    doc: Doc = json.loads((root / f"{split}.json").read_text())
    return doc


def _write(root: Path, split: str, doc: Doc) -> None:
    (root / f"{split}.json").write_text(json.dumps(doc))  # NaN as JSON's NaN, as Python's json writes it


def _anns_of(doc: Doc, image: Doc) -> list[Doc]:
    return [a for a in doc["annotations"] if a["image_id"] == image["id"]]


def _pixels(root: Path, image: Doc) -> np.ndarray:
    pixels = cv2.imread(str(root / "images" / image["file_name"]), cv2.IMREAD_COLOR)
    assert pixels is not None, image["file_name"]
    return pixels


def _replace_file(root: Path, doc: Doc, image: Doc, suffix: str, write: Callable[[Path, np.ndarray], None]) -> str:
    """Writes the image anew as ``<stem><suffix>`` through ``write`` and points the JSON at it."""
    pixels = _pixels(root, image)
    (root / "images" / image["file_name"]).unlink()
    image["file_name"] = Path(image["file_name"]).stem + suffix
    write(root / "images" / image["file_name"], pixels)
    return str(image["file_name"])


def _truncated(root: Path, doc: Doc, image: Doc) -> str:
    path = root / "images" / image["file_name"]
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    return str(image["file_name"])


def _zero_bytes(root: Path, doc: Doc, image: Doc) -> str:
    (root / "images" / image["file_name"]).write_bytes(b"")
    return str(image["file_name"])


def _exif_rotated(root: Path, doc: Doc, image: Doc) -> str:
    """A JPEG stored taller than wide (padded below, so every box still fits the JSON's size) whose EXIF turns it
    a quarter: decoded, it is wider than tall, unlike the JSON's width/height (those of the stored pixels)."""
    def write(path: Path, pixels: np.ndarray) -> None:
        tall = np.full((pixels.shape[0] + 40, pixels.shape[1], 3), 128, np.uint8)
        tall[: pixels.shape[0]] = pixels
        exif = Image.Exif()
        exif[EXIF_ORIENTATION] = ROTATED_90
        Image.fromarray(tall[:, :, ::-1]).save(path, "JPEG", quality=95, exif=exif)
        image["height"] = tall.shape[0]

    return _replace_file(root, doc, image, ".jpg", write)


def _pil_writer(mode: str, fmt: str) -> Callable[[Path, np.ndarray], None]:
    def write(path: Path, pixels: np.ndarray) -> None:
        Image.fromarray(pixels[:, :, ::-1]).convert(mode).save(path, fmt)
    return write


def _sixteen_bit(path: Path, pixels: np.ndarray) -> None:
    cv2.imwrite(str(path), pixels.astype(np.uint16) * 257)


def _box(change: Callable[[list[float], Doc], None]) -> Callable[[Path, Doc, Doc], str]:
    """A defect of the image's first box."""
    def apply(root: Path, doc: Doc, image: Doc) -> str:
        ann = _anns_of(doc, image)[0]
        change(ann["bbox"], image)
        return f"annotation {ann['id']} of {image['file_name']}"
    return apply


def _no_area(bbox: list[float], image: Doc) -> None:
    bbox[2] = 0.0


def _outside(bbox: list[float], image: Doc) -> None:
    bbox[0] = image["width"] - bbox[2] / 2 + 5  # over half of it past the right edge


def _nan(bbox: list[float], image: Doc) -> None:
    bbox[1] = math.nan


def _duplicate_image_id(root: Path, doc: Doc, image: Doc) -> str:
    """This image takes the id of another; its annotations follow it (none is left pointing nowhere)."""
    other = next(i for i in doc["images"] if i is not image)
    for ann in _anns_of(doc, image):
        ann["image_id"] = other["id"]
    image["id"] = other["id"]
    return str(image["file_name"])


def _duplicate_annotation_id(root: Path, doc: Doc, image: Doc) -> str:
    ann = _anns_of(doc, image)[0]
    ann["id"] = next(a["id"] for a in doc["annotations"] if a is not ann)
    return f"annotation {ann['id']} of {image['file_name']}"


def _listed_twice(root: Path, doc: Doc, image: Doc) -> str:
    doc["images"].append({**image, "id": max(i["id"] for i in doc["images"]) + 1})
    return str(image["file_name"])


def _without_objects(root: Path, doc: Doc, image: Doc) -> str:
    doc["annotations"] = [a for a in doc["annotations"] if a["image_id"] != image["id"]]
    return str(image["file_name"])


def _class_absent(root: Path, doc: Doc, image: Doc) -> str:
    """The image's first object's class, taken out of the whole split (val: its AP is undefined)."""
    category = _anns_of(doc, image)[0]["category_id"]
    doc["annotations"] = [a for a in doc["annotations"] if a["category_id"] != category]
    return str(next(c["name"] for c in doc["categories"] if c["id"] == category))


DEFECTS: dict[str, tuple[str, str, Callable[[Path, Doc, Doc], str]]] = {
    "truncated": ("error", "image unreadable", _truncated),
    "zero-bytes": ("error", "image unreadable", _zero_bytes),
    "exif-rotated": ("error", "size differs from the JSON", _exif_rotated),
    "box-without-area": ("error", "box without area", _box(_no_area)),
    "box-outside": ("error", "box outside its image", _box(_outside)),
    "box-nan": ("error", "box not finite", _box(_nan)),
    "duplicate-image-id": ("error", "duplicate image id", _duplicate_image_id),
    "duplicate-annotation-id": ("error", "duplicate annotation id", _duplicate_annotation_id),
    "listed-twice": ("error", "file listed twice", _listed_twice),
    "grayscale": ("fine", "", lambda r, d, i: _replace_file(r, d, i, ".png", _pil_writer("L", "PNG"))),
    "cmyk": ("fine", "", lambda r, d, i: _replace_file(r, d, i, ".jpg", _pil_writer("CMYK", "JPEG"))),
    "16-bit": ("fine", "", lambda r, d, i: _replace_file(r, d, i, ".png", _sixteen_bit)),
    "rgba": ("fine", "", lambda r, d, i: _replace_file(r, d, i, ".png", _pil_writer("RGBA", "PNG"))),
    "without-objects": ("warning", "image without objects", _without_objects),
    "class-absent": ("warning", "class absent from val", _class_absent),
}
"""Defect -> (outcome, the kind of finding the check reports, how to make it)."""


def apply_defect(root: Path, defect: str, split: str, index: int = 0) -> str:
    """Puts ``defect`` into image ``index`` of ``split`` (``train`` or ``val``); returns the item it touched."""
    doc = _read(root, split)
    item = DEFECTS[defect][2](root, doc, doc["images"][index])
    _write(root, split, doc)
    return item


def write_defects(out: Path, *, size: int = 160, seed: int = 0) -> list[tuple[str, str, str, str]]:
    """A synthetic dataset carrying every defect, each on its own image (``class-absent`` in val).

    Returns:
        (defect, outcome, split, item) for each.
    """
    write_dataset(out, images=4 * len(DEFECTS), size=size, seed=seed)
    placed = []
    train_index = 0
    for defect, (outcome, _, _) in DEFECTS.items():
        split = "val" if defect == "class-absent" else "train"
        index = 0 if split == "val" else train_index
        train_index += split == "train"
        placed.append((defect, outcome, split, apply_defect(out, defect, split, index)))
    return placed
