"""Every image and every box of a COCO dataset checked before a search: all problems at once, grouped by kind.

:func:`check_dataset` reads both annotation files (a malformed one is a :class:`~cocodata.dataset.DatasetError`
naming the file and the field), decodes every image as the training pipeline will (:mod:`cocodata.imagescan`,
cached per file) and checks each box against its image. Errors stop a search; warnings (a class that never
appears in val, an image without objects) are shown and the search goes on.
"""

from __future__ import annotations

import math
import shlex
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from cocodata.dataset import AREA_RANGES, DatasetError, area_range, classes_of, load_coco
from cocodata.imagescan import Decoded, scan_images

BOX_TOLERANCE = 1.0
"""Pixels a box may reach past its image's edge: exporters round coordinates."""
SHOWN = 3
"""Items named per kind of problem; the count says how many more."""
CARD_FILE = "dataset-card.json"
"""The search's parent-run artifact holding the :class:`DatasetCard` of the annotations its trials read."""

ERRORS: dict[str, str] = {
    "image missing": "the file is not in the image folder",
    "image unreadable": "empty, truncated or not an image: training fails on it",
    "size differs from the JSON": "decoded (EXIF orientation applied, as mmdet does) to another width/height "
                                  "than the JSON says: every box would be misplaced",
    "file listed twice": "one image file under two entries",
    "duplicate image id": "two images share an id: their annotations mix",
    "duplicate annotation id": "two annotations share an id: COCO evaluation mixes them",
    "annotation of an unlisted image": "its image_id is not in 'images'",
    "annotation of an unlisted category": "its category_id is not in 'categories'",
    "categories differ from train": "val must list the same categories as train",
    "box not finite": "NaN or infinite coordinates",
    "box without area": "width or height <= 0",
    "box outside its image": f"reaches more than {BOX_TOLERANCE:g} px past the image's edge",
}
"""Kinds of problem that stop a search, and what each means."""
WARNINGS: dict[str, str] = {
    "image without objects": "mmdet leaves it out of training (filter_empty_gt); in val it is a background image",
    "class absent from val": "its AP is undefined, so the mean is over the other classes",
}


@dataclass(frozen=True)
class Finding:
    """One problem: its kind, the annotation file it is in, and the item (file name, annotation id)."""

    split: str
    kind: str
    item: str


@dataclass
class SplitCard:
    """What one split holds: the counts a user weighs a small dataset by."""

    images: int = 0
    objects: int = 0
    images_without_objects: int = 0
    per_class: Counter[str] = field(default_factory=Counter)
    per_area: Counter[str] = field(default_factory=Counter)
    sizes: Counter[tuple[int, int]] = field(default_factory=Counter)

    def to_json(self) -> dict[str, Any]:
        return {"images": self.images, "objects": self.objects, "images_without_objects": self.images_without_objects,
                "per_class": dict(self.per_class), "per_area": dict(self.per_area),
                "sizes": [[w, h, n] for (w, h), n in self.sizes.items()]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SplitCard:
        return cls(images=data["images"], objects=data["objects"],
                   images_without_objects=data["images_without_objects"], per_class=Counter(data["per_class"]),
                   per_area=Counter(data["per_area"]), sizes=Counter({(w, h): n for w, h, n in data["sizes"]}))


@dataclass(frozen=True)
class DatasetCard:
    """The dataset card: each split's counts, and the classes in train's order. ``validate`` prints it; the search
    logs it on its parent run (:data:`CARD_FILE`) for the report."""

    splits: dict[str, SplitCard]
    classes: tuple[str, ...]

    def rows(self) -> list[tuple[str, list[str]]]:
        """(label, one cell per split): images, objects, empty images, area ranges, sizes; objects per class."""
        cards = self.splits.values()
        return [("images", [str(c.images) for c in cards]),
                ("objects", [str(c.objects) for c in cards]),
                ("images without objects", [str(c.images_without_objects) for c in cards]),
                *((f"{name} objects", [str(c.per_area[name]) for c in cards]) for name in AREA_RANGES),
                ("image sizes", [_sizes(c.sizes) for c in cards]),
                *((f"class {name}", [str(c.per_class[name]) for c in cards]) for name in self.classes)]

    def lines(self) -> list[str]:
        """The rows as aligned text, the splits as column heads."""
        rows = [("", list(self.splits)), *self.rows()]
        width = max(len(label) for label, _ in rows)
        columns = [max(len(cells[i]) for _, cells in rows) for i in range(len(self.splits))]
        return [f"{label:<{width}}  " + "  ".join(f"{cell:>{w}}" for cell, w in zip(cells, columns, strict=True))
                for label, cells in rows]

    def to_json(self) -> dict[str, Any]:
        return {"classes": list(self.classes), "splits": {name: c.to_json() for name, c in self.splits.items()}}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DatasetCard:
        return cls(splits={name: SplitCard.from_json(c) for name, c in data["splits"].items()},
                   classes=tuple(data["classes"]))

    @classmethod
    def of(cls, docs: dict[str, dict[str, Any]], classes: tuple[str, ...]) -> DatasetCard:
        """The card of these annotation files (by name)."""
        return cls(splits={name: _card(doc) for name, doc in docs.items()}, classes=classes)


@dataclass(frozen=True)
class DataCheck:
    """The outcome of :func:`check_dataset`."""

    root: Path
    findings: tuple[Finding, ...]
    card: dict[str, SplitCard]
    classes: tuple[str, ...]
    decoded: int
    """Image files decoded by this check (the others came from the cache)."""
    seconds: float
    docs: dict[str, dict[str, Any]] = field(repr=False, compare=False)
    """Each annotation file as read, by its name."""
    files: dict[str, Decoded] = field(repr=False, compare=False)
    """Each image file's decoding outcome, by its name in the annotation files."""

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.kind in ERRORS]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.kind in WARNINGS]

    def groups(self, *, errors: bool) -> Iterator[tuple[str, str, list[str]]]:
        """(split, kind, items) per kind of error (or warning), in the order of :data:`ERRORS`."""
        kinds = ERRORS if errors else WARNINGS
        for split in self.card:
            for kind in kinds:
                items = [f.item for f in self.findings if f.split == split and f.kind == kind]
                if items:
                    yield split, kind, items

    def problem_lines(self) -> list[str]:
        """One line per kind of error then of warning, with its count and the first few items."""
        return [group_line(split, kind, items) for errors in (True, False)
                for split, kind, items in self.groups(errors=errors)]

    @property
    def dataset_card(self) -> DatasetCard:
        return DatasetCard(splits=self.card, classes=self.classes)

    def card_lines(self) -> list[str]:
        return self.dataset_card.lines()


def check_command(root: str | Path, train: str, val: str, images: str) -> str:
    """The ``dettune data check`` command line for this dataset."""
    folder = f" --images {shlex.quote(images)}" if images != "images" else ""
    return f"dettune data check {shlex.quote(str(root))} --train {shlex.quote(train)} --val {shlex.quote(val)}{folder}"


def fix_line(root: str | Path, train: str, val: str, images: str) -> str:
    """The one line that ends a list of errors."""
    return (f"correct or remove those entries in the annotation files (or the image files they name), then check "
            f"again with `{check_command(root, train, val, images)}`")


def group_line(split: str, kind: str, items: list[str]) -> str:
    shown = ", ".join(items[:SHOWN]) + (f" and {len(items) - SHOWN} more" if len(items) > SHOWN else "")
    meaning = ERRORS.get(kind) or WARNINGS[kind]
    return f"{split}: {kind} ({len(items)}; {meaning}): {shown}"


def check_dataset(root: str | Path, train: str, val: str, images: str = "images", *,
                  progress: TextIO | None = None) -> DataCheck:
    """Checks every image and box of both splits.

    Raises:
        DatasetError: the root or an annotation file is missing, not JSON, or not valid COCO (naming the field).
    """
    started = time.perf_counter()
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} does not exist: fix data.root (for a synthetic demo dataset "
                           f"there, run `dettune data synth {root}`)")
    docs = {train: load_coco(root / train), val: load_coco(root / val)}
    image_dir = root / images
    names = [image["file_name"] for doc in docs.values() for image in doc["images"]]
    scan = scan_images(image_dir, names, progress=progress)
    classes = classes_of(root / train, docs[train])
    findings: list[Finding] = []
    card: dict[str, SplitCard] = {}
    for split, doc in docs.items():
        findings += _split_findings(split, doc, scan.files)
        card[split] = _card(doc)
    if classes_of(root / val, docs[val]) != classes:
        findings.append(Finding(val, "categories differ from train", val))
    else:
        findings += [Finding(val, "class absent from val", name) for name in classes
                     if not card[val].per_class[name]]
    return DataCheck(root=root, findings=tuple(findings), card=card, classes=classes,
                     decoded=scan.decoded_now, seconds=time.perf_counter() - started, docs=docs, files=scan.files)


def _split_findings(split: str, doc: dict[str, Any], decoded: dict[str, Decoded]) -> Iterator[Finding]:
    images = doc["images"]
    yield from _duplicates(split, "duplicate image id", [(i["id"], i["file_name"]) for i in images], "id {}")
    yield from _duplicates(split, "file listed twice", [(i["file_name"], f"id {i['id']}") for i in images], "{}")
    files = {image["id"]: image["file_name"] for image in images}
    yield from _duplicates(split, "duplicate annotation id",
                           [(a["id"], files.get(a["image_id"], "?")) for a in doc["annotations"]], "annotation {}")
    for image in images:
        yield from _image_findings(split, image, decoded[image["file_name"]])
    by_id = {image["id"]: image for image in images}
    categories = {c["id"] for c in doc["categories"]}
    annotated = set()
    for ann in doc["annotations"]:
        image = by_id.get(ann["image_id"])
        where = f"annotation {ann['id']}" + (f" of {image['file_name']}" if image else "")
        if image is None:
            yield Finding(split, "annotation of an unlisted image", f"{where} (image_id {ann['image_id']})")
            continue
        annotated.add(image["id"])
        if ann["category_id"] not in categories:
            yield Finding(split, "annotation of an unlisted category", f"{where} (category_id {ann['category_id']})")
        kind = box_problem(ann["bbox"], image["width"], image["height"])
        if kind is not None:
            yield Finding(split, kind, f"{where} [{', '.join(f'{v:g}' for v in ann['bbox'])}]")
    yield from (Finding(split, "image without objects", i["file_name"]) for i in images if i["id"] not in annotated)


def _duplicates(split: str, kind: str, keyed: list[tuple[Any, str]], label: str) -> Iterator[Finding]:
    """One finding per key that more than one entry holds, naming the key (through ``label``) and each entry."""
    holders: dict[Any, list[str]] = {}
    for key, holder in keyed:
        holders.setdefault(key, []).append(holder)
    for key, names in holders.items():
        if len(names) > 1:
            yield Finding(split, kind, f"{label.format(key)} ({', '.join(names)})")


def _image_findings(split: str, image: dict[str, Any], decoded: Decoded) -> Iterator[Finding]:
    kind = image_problem(image, decoded)
    name = image["file_name"]
    if kind == "image unreadable":
        yield Finding(split, kind, f"{name} ({decoded.error})")
    elif kind == "size differs from the JSON":
        yield Finding(split, kind, f"{name} (decodes to {decoded.width}x{decoded.height}, "
                                   f"JSON {image['width']}x{image['height']})")
    elif kind is not None:
        yield Finding(split, kind, name)


def image_problem(image: dict[str, Any], decoded: Decoded) -> str | None:
    """The kind of problem of an image entry, given what decoding its file gave, or None."""
    if decoded.error == "missing":
        return "image missing"
    if decoded.error is not None:
        return "image unreadable"
    if (decoded.width, decoded.height) != (image["width"], image["height"]):
        return "size differs from the JSON"
    return None


def box_problem(bbox: list[float], width: int, height: int) -> str | None:
    """The kind of problem of a COCO box ``[x, y, w, h]`` on an image of this size, or None."""
    if not all(math.isfinite(v) for v in bbox):
        return "box not finite"
    x, y, w, h = bbox
    if w <= 0 or h <= 0:
        return "box without area"
    if x < -BOX_TOLERANCE or y < -BOX_TOLERANCE or x + w > width + BOX_TOLERANCE or y + h > height + BOX_TOLERANCE:
        return "box outside its image"
    return None


def _card(doc: dict[str, Any]) -> SplitCard:
    names = {c["id"]: c["name"] for c in doc["categories"]}
    card = SplitCard(images=len(doc["images"]), objects=len(doc["annotations"]))
    annotated = {a["image_id"] for a in doc["annotations"]}
    card.images_without_objects = sum(1 for i in doc["images"] if i["id"] not in annotated)
    card.sizes.update((i["width"], i["height"]) for i in doc["images"])
    for ann in doc["annotations"]:
        card.per_class[names.get(ann["category_id"], "?")] += 1
        card.per_area[_area_range(ann)] += 1
    return card


def _area_range(ann: dict[str, Any]) -> str:
    area = ann.get("area")
    if not isinstance(area, int | float) or not math.isfinite(area):
        _, _, w, h = ann["bbox"]
        area = w * h if math.isfinite(w * h) else 0.0
    return area_range(area)


def _sizes(sizes: Counter[tuple[int, int]]) -> str:
    """``640x480`` when all images share it, else the smallest and largest areas."""
    if len(sizes) == 1:
        (w, h), = sizes
        return f"{w}x{h}"
    small, large = min(sizes, key=lambda s: s[0] * s[1]), max(sizes, key=lambda s: s[0] * s[1])
    return f"{small[0]}x{small[1]}..{large[0]}x{large[1]}"
