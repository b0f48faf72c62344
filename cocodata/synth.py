"""Deterministic synthetic COCO-format object-detection dataset for tests and demos.

Every image holds 2-6 objects on a cluttered, muted background. Each of the ten classes has its own
(shape, hue) signature, so a small CNN can learn it, while brightness, size, aspect ratio, rotation
and mirroring are jittered. Objects never touch each other (their boxes may overlap), so every
annotation polygon is exactly the set of visible object pixels: the pixels are painted from the
polygon's COCO rasterisation (``pycocotools``, the rasteriser MMDetection uses for mask targets).

The same arguments always give byte-identical files.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from cocodata.dataset import LARGE_MIN, SMALL_MAX, area_range

CLASSES: tuple[str, ...] = (
    "General trash",
    "Paper",
    "Paper pack",
    "Metal",
    "Glass",
    "Plastic",
    "Styrofoam",
    "Plastic bag",
    "Battery",
    "Clothing",
)

_MIN_IMAGES = 4
VAL_FRACTION = 0.25
"""The share of images in the val split, by default."""
_MIN_SIZE = 144
_MAX_SIZE = 2048

# OpenCV hue (0..179) of each class, in CLASSES order: ten hues 18 apart, shuffled against the shapes.
_HUES = (0, 90, 36, 126, 18, 108, 54, 144, 72, 162)
_HUE_JITTER = 3
_MAX_BOX_IOU = 0.3
_EDGE = 2.0  # minimum distance in pixels between a polygon and the image border
_STRIP = 42  # pixels left free beside a large object, so a medium one fits next to it
_NOISE_SIGMA = 4.0
_OBJECT_TRIES = 60
_EXTRA_TRIES = 40
_LAYOUT_TRIES = 200


@dataclass(frozen=True)
class SynthSummary:
    """What :func:`write_dataset` wrote.

    Attributes:
        out: Dataset root holding ``train.json``, ``val.json`` and ``images/``.
        train_images: Number of images in the train split.
        val_images: Number of images in the val split.
        annotations: Number of annotations over both splits.
        area_counts: Annotations per COCO area range, keys ``small``, ``medium`` and ``large``.
    """

    out: Path
    train_images: int
    val_images: int
    annotations: int
    area_counts: dict[str, int]


@dataclass(frozen=True)
class _Placed:
    """One object laid out on an image."""

    category_id: int
    polygon: np.ndarray  # (n, 2) vertices in COCO pixel-edge coordinates
    area: float
    region: tuple[slice, slice]
    mask: np.ndarray  # bool mask of ``region``
    colour: tuple[int, int, int]  # BGR


@dataclass
class _Canvas:
    """Occupancy of one image while objects are being laid out."""

    size: int
    occupied: np.ndarray
    boxes: list[tuple[float, float, float, float]] = field(default_factory=list)

    @classmethod
    def empty(cls, size: int) -> _Canvas:
        """Returns a canvas with nothing placed yet."""
        return cls(size=size, occupied=np.zeros((size, size), dtype=bool))

    def fits(self, region: tuple[slice, slice], mask: np.ndarray, box: tuple[float, ...]) -> bool:
        """Whether an object keeps a one-pixel gap to all others and limited box overlap."""
        halo = cv2.dilate(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        if (self.occupied[region] & halo).any():
            return False
        return all(_box_iou(box, other) <= _MAX_BOX_IOU for other in self.boxes)

    def add(self, placed: _Placed) -> None:
        """Marks an object's pixels and box as taken."""
        self.occupied[placed.region] |= placed.mask
        self.boxes.append(_bbox(placed.polygon))


class _ClassCycle:
    """Category ids for small and medium objects: back-to-back random permutations of all classes.

    Only placed objects consume an id, so every ten placements cover all classes, except where a
    required object had to fall back to a class that its permutation had already used.
    """

    def __init__(self, rng: np.random.Generator) -> None:
        self._rng = rng
        self._queue: list[int] = []
        self._pos = 0

    def peek(self) -> int:
        """Returns the next category id without consuming it."""
        if self._pos >= len(self._queue):
            self._queue.extend(int(c) + 1 for c in self._rng.permutation(len(CLASSES)))
        return self._queue[self._pos]

    def take(self, category_id: int) -> None:
        """Consumes an id: the peeked one, or another swapped forward from later in its permutation."""
        self.peek()
        end = (self._pos // len(CLASSES) + 1) * len(CLASSES)
        rest = self._queue[self._pos : end]
        if category_id in rest:
            j = self._pos + rest.index(category_id)
            self._queue[self._pos], self._queue[j] = self._queue[j], self._queue[self._pos]
        else:
            self._queue.insert(self._pos, category_id)
        self._pos += 1

    def mark(self) -> int:
        """Returns the current position, for :meth:`reset`."""
        return self._pos

    def reset(self, pos: int) -> None:
        """Returns to a position given by :meth:`mark`."""
        self._pos = pos


def _normalise(points: Any) -> np.ndarray:
    """Scales and shifts points so their tight bounding box is exactly [-1, 1] x [-1, 1]."""
    pts = np.asarray(points, dtype=np.float64)
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    return (pts - (lo + hi) / 2) / ((hi - lo) / 2)


def _circle_points(n: int, start: float = -math.pi / 2, stop: float | None = None) -> np.ndarray:
    """Returns ``n`` unit-circle points from angle ``start``, spread over a full turn or up to ``stop``."""
    angles = start + np.arange(n) * (2 * math.pi / n) if stop is None else np.linspace(start, stop, n)
    return np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _star(points: int = 5, inner: float = 0.45) -> np.ndarray:
    """Returns a star polygon with alternating outer and inner vertices."""
    pts = _circle_points(2 * points)
    pts[1::2] *= inner
    return pts


def _unit_shapes() -> tuple[np.ndarray, ...]:
    """Returns each class's shape, in CLASSES order, normalised to [-1, 1] x [-1, 1]."""
    a = 0.34  # half-thickness of the cross arms
    return tuple(
        _normalise(shape)
        for shape in (
            [(-1, -1), (1, -1), (1, 1), (-1, 1)],  # rectangle
            _circle_points(40),  # ellipse
            [(0, -1), (1, 1), (-1, 1)],  # triangle
            _circle_points(5),  # pentagon
            _star(),  # star
            [
                (-a, -1),
                (a, -1),
                (a, -a),
                (1, -a),
                (1, a),
                (a, a),
                (a, 1),
                (-a, 1),
                (-a, a),
                (-1, a),
                (-1, -a),
                (-a, -a),
            ],  # cross
            _circle_points(6, start=0.0),  # hexagon
            _circle_points(24, start=math.pi, stop=2 * math.pi),  # half disc
            [(0, 0), (0.42, 0), (0.42, 0.58), (1, 0.58), (1, 1), (0, 1)],  # L
            [(0, 0.35), (0.55, 0.35), (0.55, 0), (1, 0.5), (0.55, 1), (0.55, 0.65), (0, 0.65)],  # arrow
        )
    )


_SHAPES = _unit_shapes()


def _shoelace(polygon: np.ndarray) -> float:
    """Returns the area of a simple polygon given as (n, 2) vertices."""
    x, y = polygon[:, 0], polygon[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)


_FILL = tuple(_shoelace(shape) / 4 for shape in _SHAPES)


def _bbox(polygon: np.ndarray) -> tuple[float, float, float, float]:
    """Returns the tight COCO box (x, y, w, h) of a polygon."""
    x0, y0 = polygon.min(axis=0)
    x1, y1 = polygon.max(axis=0)
    return float(x0), float(y0), float(x1 - x0), float(y1 - y0)


def _box_iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Returns the IoU of two (x, y, w, h) boxes."""
    iw = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    ih = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def _area_bounds(kind: str, size: int) -> tuple[float, float]:
    """Returns the (low, high) target polygon area for objects of one COCO range, with safety margins."""
    if kind == "small":
        return 180.0, 0.85 * SMALL_MAX
    if kind == "medium":
        return 1.2 * SMALL_MAX, min(0.7 * LARGE_MIN, 0.15 * size * size)
    low = 1.03 * LARGE_MIN
    return low, max(1.05 * low, 0.3 * size * size)


def _large_classes(size: int) -> list[int]:
    """Returns the category ids whose shape fits a large object beside a medium one at this size."""
    low = _area_bounds("large", size)[0]
    room = size - 2 * _EDGE - _STRIP
    return [i + 1 for i, fill in enumerate(_FILL) if math.sqrt(low / fill) <= room]


def _rotation(rng: np.random.Generator, max_degrees: float) -> np.ndarray:
    """Returns a random 2x2 rotation matrix, mirrored half of the time."""
    theta = math.radians(rng.uniform(-max_degrees, max_degrees))
    c, s = math.cos(theta), math.sin(theta)
    mirror = -1.0 if rng.random() < 0.5 else 1.0
    return np.array([[c * mirror, -s], [s * mirror, c]])


def _candidate(rng: np.random.Generator, category_id: int, kind: str, size: int) -> np.ndarray | None:
    """Returns a random polygon of one class and area range inside the image, or None if it misses."""
    low, high = _area_bounds(kind, size)
    target = math.exp(rng.uniform(math.log(low), math.log(high)))
    aspect = math.exp(rng.uniform(-0.3, 0.3)) if kind != "large" else math.exp(rng.uniform(-0.1, 0.1))
    width = math.sqrt(target * aspect / _FILL[category_id - 1])
    height = target / (_FILL[category_id - 1] * width)
    rotation = _rotation(rng, 8 if kind == "large" else 30)
    pts = (_SHAPES[category_id - 1] * (width / 2, height / 2)) @ rotation.T
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    if ((hi - lo) > size - 2 * _EDGE - 1).any():
        return None
    if kind == "large":  # into a corner, leaving an L-shaped strip for the other objects
        inset = rng.uniform(0.0, 1.0, 2)
        centre = np.where(rng.random(2) < 0.5, _EDGE - lo + inset, size - _EDGE - hi - inset)
    else:
        centre = rng.uniform(_EDGE - lo, size - _EDGE - hi)
    polygon = np.round(pts + centre, 2)
    area = _shoelace(polygon)
    return polygon if low * 0.95 <= area <= high * 1.05 and area_range(area) == kind else None


def _rasterise(polygon: np.ndarray, size: int) -> tuple[tuple[slice, slice], np.ndarray]:
    """Returns a polygon's COCO mask, cropped to a region around it, and that region."""
    x0 = max(math.floor(polygon[:, 0].min()) - 2, 0)
    y0 = max(math.floor(polygon[:, 1].min()) - 2, 0)
    x1 = min(math.ceil(polygon[:, 0].max()) + 2, size)
    y1 = min(math.ceil(polygon[:, 1].max()) + 2, size)
    local = (polygon - (x0, y0)).ravel().tolist()
    rles = mask_utils.frPyObjects([local], y1 - y0, x1 - x0)
    with warnings.catch_warnings():  # pycocotools' decode trips a numpy 2 copy-keyword DeprecationWarning
        warnings.filterwarnings("ignore", "__array__ implementation", DeprecationWarning)
        mask = mask_utils.decode(rles)[:, :, 0].astype(bool)
    return (slice(y0, y1), slice(x0, x1)), mask


def _hsv_to_bgr(hue: int, sat: int, val: int) -> tuple[int, int, int]:
    """Converts one OpenCV HSV colour (hue 0..179) to BGR."""
    hsv = np.array([[[hue, sat, val]]], dtype=np.uint8)
    b, g, r = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0]
    return int(b), int(g), int(r)


def _object_colour(rng: np.random.Generator, category_id: int) -> tuple[int, int, int]:
    """Returns a saturated, bright colour near the class hue."""
    hue = (_HUES[category_id - 1] + int(rng.integers(-_HUE_JITTER, _HUE_JITTER + 1))) % 180
    return _hsv_to_bgr(hue, int(rng.integers(190, 256)), int(rng.integers(175, 256)))


def _muted_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    """Returns a random low-saturation colour for the background and its clutter."""
    return _hsv_to_bgr(int(rng.integers(0, 180)), int(rng.integers(0, 50)), int(rng.integers(100, 200)))


def _place(
    rng: np.random.Generator, canvas: _Canvas, kind: str, category_id: int, tries: int
) -> _Placed | None:
    """Tries to put one object of a class and area range on the canvas; returns it, or None."""
    for _ in range(tries):
        polygon = _candidate(rng, category_id, kind, canvas.size)
        if polygon is None:
            continue
        region, mask = _rasterise(polygon, canvas.size)
        if canvas.fits(region, mask, _bbox(polygon)):
            placed = _Placed(
                category_id=category_id,
                polygon=polygon,
                area=round(_shoelace(polygon), 2),
                region=region,
                mask=mask,
                colour=_object_colour(rng, category_id),
            )
            canvas.add(placed)
            return placed
    return None


def _plan(rng: np.random.Generator, index_in_split: int) -> tuple[list[str], int]:
    """Returns the area ranges of one image's objects and how many of them (leading) are required.

    Every fourth image of a split, its first included, gets a large object; every image gets a
    medium and a small one, so each split holds all three COCO area ranges.
    """
    required = (["large"] if index_in_split % 4 == 0 else []) + ["medium", "small"]
    extra = int(rng.integers(0, 6 - len(required) + 1))
    extras = ["medium" if rng.random() < 0.55 else "small" for _ in range(extra)]
    return required + extras, len(required)


def _class_order(
    rng: np.random.Generator, size: int, kind: str, required: bool, cycle: _ClassCycle
) -> list[int]:
    """Returns the category ids to try, in order, for one object.

    Large objects take a random class among those whose shape fits; small and medium ones take the
    next class of the cycle. Required objects fall back to the other classes, fullest shapes first.
    """
    if kind == "large":
        large = _large_classes(size)
        first = int(rng.choice(large))
        pool = large
    else:
        first = cycle.peek()
        pool = sorted(range(1, len(CLASSES) + 1), key=lambda c: -_FILL[c - 1])
    return [first] + [c for c in pool if c != first] if required else [first]


def _layout(
    rng: np.random.Generator, size: int, kinds: list[str], required: int, cycle: _ClassCycle
) -> list[_Placed]:
    """Places one image's objects, starting over until every required object fits."""
    for _ in range(_LAYOUT_TRIES):
        canvas, placed, start = _Canvas.empty(size), [], cycle.mark()
        for i, kind in enumerate(kinds):
            obj = None
            for category_id in _class_order(rng, size, kind, i < required, cycle):
                obj = _place(rng, canvas, kind, category_id, _OBJECT_TRIES if i < required else _EXTRA_TRIES)
                if obj is not None:
                    break
            if obj is None and i < required:
                break
            if obj is not None:
                placed.append(obj)
                if kind != "large":
                    cycle.take(obj.category_id)
        else:
            return placed
        cycle.reset(start)
    raise RuntimeError(f"could not lay out objects {kinds} on a {size}x{size} image")


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Returns a smoothly varying muted background with random unannotated lines and blobs."""
    grid = np.array([[_muted_colour(rng) for _ in range(4)] for _ in range(4)], dtype=np.uint8)
    img = cv2.resize(grid, (size, size), interpolation=cv2.INTER_LINEAR)
    scale = min(max((size / 160) ** 2, 1.0), 40.0)
    for _ in range(int(rng.integers(3, 9) * scale)):
        cx, cy = (int(v) for v in rng.integers(0, size, 2))
        axes = tuple(int(v) for v in rng.integers(3, max(size // 8, 4), 2))
        angle = float(rng.uniform(0, 180))
        cv2.ellipse(img, (cx, cy), axes, angle, 0, 360, _muted_colour(rng), -1, cv2.LINE_AA)
    for _ in range(int(rng.integers(4, 12) * scale)):
        p1 = tuple(int(v) for v in rng.integers(0, size, 2))
        p2 = tuple(int(v) for v in rng.integers(0, size, 2))
        cv2.line(img, p1, p2, _muted_colour(rng), int(rng.integers(1, 4)), cv2.LINE_AA)
    return img


def _render(rng: np.random.Generator, size: int, objects: list[_Placed]) -> np.ndarray:
    """Paints the objects' exact masks over a cluttered background and adds sensor noise."""
    img = _background(rng, size)
    for obj in objects:
        img[obj.region][obj.mask] = obj.colour
    noisy = img.astype(np.float32) + rng.normal(0.0, _NOISE_SIGMA, img.shape).astype(np.float32)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def _annotation(obj: _Placed, ann_id: int, image_id: int) -> dict[str, Any]:
    """Returns the COCO annotation of one placed object."""
    x, y, w, h = _bbox(obj.polygon)
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": obj.category_id,
        "bbox": [round(x, 2), round(y, 2), round(w, 2), round(h, 2)],
        "area": obj.area,
        "segmentation": [[float(v) for v in obj.polygon.ravel()]],
        "iscrowd": 0,
    }


def _coco(images: list[dict[str, Any]], annotations: list[dict[str, Any]]) -> dict[str, Any]:
    """Returns a complete COCO document, free of timestamps."""
    return {
        "info": {"description": "dettune synthetic trash detection data", "version": "1.0"},
        "licenses": [
            {"id": 1, "name": "CC0-1.0", "url": "https://creativecommons.org/publicdomain/zero/1.0/"}
        ],
        "categories": [
            {"id": i + 1, "name": name, "supercategory": "trash"} for i, name in enumerate(CLASSES)
        ],
        "images": images,
        "annotations": annotations,
    }


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Writes JSON with sorted keys and fixed separators, so equal data gives equal bytes."""
    path.write_text(json.dumps(data, sort_keys=True, separators=(",", ":")) + "\n", encoding="utf-8")


def _write_png(path: Path, img: np.ndarray) -> None:
    """Writes a PNG with fixed encoder settings."""
    if not cv2.imwrite(str(path), img, [cv2.IMWRITE_PNG_COMPRESSION, 3]):
        raise OSError(f"could not write {path}")


def check_arguments(images: int, size: int, val_fraction: float = VAL_FRACTION) -> None:
    """Checks :func:`write_dataset`'s arguments before anything is written.

    Raises:
        ValueError: Naming the argument, the rule and the value.
    """
    if images < _MIN_IMAGES:
        raise ValueError(f"--images must be >= {_MIN_IMAGES}, got {images}")
    if not _MIN_SIZE <= size <= _MAX_SIZE:
        raise ValueError(
            f"--size must be between {_MIN_SIZE} and {_MAX_SIZE} (large objects need > 96x96 px), got {size}"
        )
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"--val-fraction must be in (0, 1), got {val_fraction}")


def write_dataset(
    out: Path, *, images: int = 48, size: int = 160, seed: int = 0, val_fraction: float = VAL_FRACTION
) -> SynthSummary:
    """Writes a synthetic COCO detection dataset: ``train.json``, ``val.json`` and ``images/*.png``.

    Args:
        out: Dataset root; created if missing. Existing files of the same names are overwritten.
        images: Total number of images, at least 4.
        size: Width and height of every image in pixels, 144..2048.
        seed: Seed of the only random generator used; equal arguments give byte-identical files.
        val_fraction: Share of images in the val split, in (0, 1); each split gets at least one image.

    Returns:
        A summary of what was written.

    Raises:
        ValueError: An argument is out of range.
    """
    check_arguments(images, size, val_fraction)
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    cycle = _ClassCycle(rng)
    n_val = min(max(round(images * val_fraction), 1), images - 1)
    splits: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]]]] = {
        "train": ([], []),
        "val": ([], []),
    }
    counts = {"small": 0, "medium": 0, "large": 0}
    ann_id = 0
    for index in range(images):
        split = "train" if index < images - n_val else "val"
        kinds, required = _plan(rng, index if split == "train" else index - (images - n_val))
        objects = _layout(rng, size, kinds, required, cycle)
        image_id, file_name = index + 1, f"{index + 1:06d}.png"
        _write_png(out / "images" / file_name, _render(rng, size, objects))
        split_images, split_anns = splits[split]
        split_images.append({"id": image_id, "file_name": file_name, "width": size, "height": size})
        for obj in objects:
            ann_id += 1
            split_anns.append(_annotation(obj, ann_id, image_id))
            counts[area_range(obj.area)] += 1
    for split, (split_images, split_anns) in splits.items():
        _write_json(out / f"{split}.json", _coco(split_images, split_anns))
    return SynthSummary(
        out=out,
        train_images=images - n_val,
        val_images=n_val,
        annotations=ann_id,
        area_counts=counts,
    )
