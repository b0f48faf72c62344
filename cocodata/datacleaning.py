"""``data: {on_bad: skip}``: the annotation files without the items the dataset check refuses, and what went.

The user's files are never touched: the cleaned copies are written where the caller says (the search's storage;
for ``dettune validate``, the user's cache). An image that can't be trained on goes with its annotations; a box
that can't goes alone; with ``on_bad: {boxes: clip}`` a box reaching past its image is clipped to it instead.
Categories that differ between the splits can't be cleaned into agreement: those still stop the search.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cocodata.datacheck import DataCheck, box_problem, image_problem
from spaces.schema import Space
from spaces.usercache import cache_dir

UNFIXABLE = frozenset({"categories differ from train"})
TAG_LEFT_OUT = "dettune.data.left_out"
"""Parent-run tag: what ``on_bad: skip`` left out, as counts; the items are its artifact :data:`LEFT_OUT_FILE`."""
LEFT_OUT_FILE = "left-out.json"


@dataclass(frozen=True)
class LeftOut:
    """One image or box the search trains without, and why."""

    split: str
    item: str
    reason: str


@dataclass(frozen=True)
class Cleaned:
    """The annotation files without what was left out."""

    docs: dict[str, dict[str, Any]]
    images: tuple[LeftOut, ...]
    boxes: tuple[LeftOut, ...]
    clipped: tuple[LeftOut, ...]

    def summary(self) -> str:
        """``2 images and 3 boxes left out, 1 box clipped (image unreadable 2, box without area 3)``."""
        reasons = Counter(item.reason for item in (*self.images, *self.boxes))
        why = ", ".join(f"{reason} {count}" for reason, count in reasons.items())
        images, boxes, clipped = len(self.images), len(self.boxes), len(self.clipped)
        text = f"{images} image{'' if images == 1 else 's'} and {boxes} box{'' if boxes == 1 else 'es'} left out"
        text += f", {clipped} box{'' if clipped == 1 else 'es'} clipped" if clipped else ""
        return text + (f" ({why})" if why else "")

    def report(self) -> str:
        """Every item left out or clipped, as JSON: the parent run's artifact."""
        return json.dumps({"left_out": {"images": [vars(i) for i in self.images],
                                        "boxes": [vars(b) for b in self.boxes]},
                           "clipped": [vars(c) for c in self.clipped]}, indent=1)

    def paths(self, folder: Path) -> dict[str, Path]:
        """Where :meth:`write` puts each cleaned file in ``folder``, by its name: under its own file name (numbered
        when two share one, e.g. ``train/ann.json`` and ``val/ann.json``)."""
        names = [Path(name).name for name in self.docs]
        unique = len(set(names)) == len(names)
        return {name: (folder / (own if unique else f"{index}-{own}")).resolve()
                for index, (name, own) in enumerate(zip(self.docs, names, strict=True))}

    def write(self, folder: Path) -> dict[str, Path]:
        """Writes each cleaned file into ``folder`` (see :meth:`paths`); returns name -> path."""
        folder.mkdir(parents=True, exist_ok=True)
        paths = self.paths(folder)
        for name, doc in self.docs.items():
            paths[name].write_text(json.dumps(doc))
        return paths

    def cached(self) -> dict[str, Path]:
        """Writes the cleaned files into the user's cache, in a folder named by their content (validate writes
        nothing beside the user's files); returns name -> path."""
        digest = hashlib.sha256(json.dumps(self.docs, sort_keys=True).encode()).hexdigest()[:24]
        return self.write(cache_dir() / "cleaned" / digest)


def can_clean(check: DataCheck) -> bool:
    return not any(finding.kind in UNFIXABLE for finding in check.errors)


def clean(check: DataCheck, *, clip: bool) -> Cleaned:
    """The check's annotation files without the images and boxes it found errors in."""
    docs, images, boxes, clipped = {}, [], [], []
    for split, doc in check.docs.items():
        kept, left = _kept_images(split, doc, check)
        images += left
        index = _Index(doc, kept)
        annotations = []
        for ann in doc["annotations"]:
            reason, bbox = _box_outcome(ann, index, clip=clip)
            where = f"annotation {ann['id']} of {kept[ann['image_id']]['file_name']}" if ann["image_id"] in kept \
                else f"annotation {ann['id']} (image_id {ann['image_id']})"
            if reason is not None:
                boxes.append(LeftOut(split, where, reason))
                continue
            if bbox != ann["bbox"]:
                clipped.append(LeftOut(split, where, f"clipped from {ann['bbox']} to {bbox}"))
                ann = {**ann, "bbox": bbox}
            annotations.append(ann)
        docs[split] = {**doc, "images": list(kept.values()), "annotations": annotations}
    return Cleaned(docs=docs, images=tuple(images), boxes=tuple(boxes), clipped=tuple(clipped))


def _kept_images(split: str, doc: dict[str, Any], check: DataCheck) -> tuple[dict[int, Any], list[LeftOut]]:
    ids = Counter(image["id"] for image in doc["images"])
    kept: dict[int, Any] = {}
    files: set[str] = set()
    left = []
    for image in doc["images"]:
        reason = image_problem(image, check.files[image["file_name"]])
        if reason is None and ids[image["id"]] > 1:
            reason = "duplicate image id"
        if reason is None and image["file_name"] in files:
            reason = "file listed twice"
        if reason is not None:
            left.append(LeftOut(split, image["file_name"], reason))
            continue
        files.add(image["file_name"])
        kept[image["id"]] = image
    return kept, left


class _Index:
    """What deciding on one annotation needs to know about its split."""

    def __init__(self, doc: dict[str, Any], kept: dict[int, Any]) -> None:
        self.kept = kept
        self.listed = frozenset(image["id"] for image in doc["images"])
        self.ann_ids = Counter(ann["id"] for ann in doc["annotations"])
        self.categories = frozenset(c["id"] for c in doc["categories"])


def _box_outcome(ann: dict[str, Any], index: _Index, *, clip: bool) -> tuple[str | None, list[float]]:
    """(why the annotation is left out, or None; its box, clipped if it may be)."""
    image = index.kept.get(ann["image_id"])
    if image is None:
        listed = ann["image_id"] in index.listed
        return ("its image was left out" if listed else "annotation of an unlisted image"), ann["bbox"]
    if index.ann_ids[ann["id"]] > 1:
        return "duplicate annotation id", ann["bbox"]
    if ann["category_id"] not in index.categories:
        return "annotation of an unlisted category", ann["bbox"]
    problem = box_problem(ann["bbox"], image["width"], image["height"])
    if problem == "box outside its image" and clip:
        bbox = _clipped(ann["bbox"], image["width"], image["height"])
        return box_problem(bbox, image["width"], image["height"]), bbox
    return problem, ann["bbox"]


def _clipped(bbox: list[float], width: int, height: int) -> list[float]:
    x, y, w, h = bbox
    left, top = max(x, 0.0), max(y, 0.0)
    return [left, top, min(x + w, width) - left, min(y + h, height) - top]


def with_cleaned_files(space: Space, paths: dict[str, Path]) -> Space:
    """The space training on the cleaned files (absolute paths; the images stay where they are)."""
    data = space.to_json()
    data["data"]["train"] = str(paths[space.data.train])
    data["data"]["val"] = str(paths[space.data.val])
    return Space.from_json(data)
