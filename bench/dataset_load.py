"""What a trial pays to open its dataset, what decoding the images costs, and what the dataset check costs before
a search, on a dataset of a real size.

A trial opens its dataset once (the annotation check, then mmdet's train and val datasets and the COCO metric,
each parsing its JSON), and decodes every image once per epoch, exactly as training without a search does. This
bench replicates a small synthetic dataset to ``--images`` train images (an eighth as many for validation; the
image files are hard links to the few rendered ones, so nothing large is written) and times each step of the
opening, in the order a trial runs them, then the decoding of one image at ``--size`` pixels, then the dataset
check every ``dettune validate`` and ``dettune search`` runs (every image decoded, every box checked): cold (an
empty cache) and again with the cache of the first run. ``--format jpg`` stores the images as JPEG (quality 90),
as most real datasets are; the synthetic ones are PNG.

    .venv/bin/python bench/dataset_load.py [--images 20000] [--size 640] [--format png|jpg]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import mmcv
from mmdet.registry import DATASETS, METRICS
from mmdet.utils import register_all_modules

from cocodata.datacheck import check_dataset
from cocodata.dataset import open_dataset
from cocodata.synth import write_dataset
from mmconfigs.build import build_config

BASE = "mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py"
POINT = {"backbone": "r18", "preset": "tiny", "scale": [160, 160]}
RENDERED = 8
"""Distinct images rendered; the others are hard links to them."""
DECODED = 200


def replicate(root: Path, split: str, count: int) -> None:
    """Writes ``big-<split>.json`` with ``count`` images, each a hard link to one of the split's rendered images
    and carrying that image's annotations."""
    doc = json.loads((root / f"{split}.json").read_text())
    anns_of: dict[int, list[dict[str, Any]]] = {}
    for ann in doc["annotations"]:
        anns_of.setdefault(ann["image_id"], []).append(ann)
    (root / "images" / "big").mkdir(exist_ok=True)
    images, annotations = [], []
    for index in range(count):
        source = doc["images"][index % len(doc["images"])]
        name = f"big/{split}{index}.png"
        (root / "images" / name).hardlink_to(root / "images" / source["file_name"])
        images.append({**source, "id": index + 1, "file_name": name})
        annotations += [{**ann, "id": len(annotations) + 1 + i, "image_id": index + 1}
                        for i, ann in enumerate(anns_of.get(source["id"], []))]
    (root / f"big-{split}.json").write_text(json.dumps({**doc, "images": images, "annotations": annotations}))


def timed(step: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    value = step()
    return time.perf_counter() - started, value


def opening_steps(root: Path) -> list[tuple[str, float]]:
    """Seconds of each step a trial runs to open the dataset, in its order."""
    seconds, dataset = timed(lambda: open_dataset(root, "big-train.json", "big-val.json"))
    rows = [("annotation check (open_dataset)", seconds)]
    cfg = build_config(BASE, POINT, dataset)
    for label, key in (("mmdet train dataset", "train_dataloader"), ("mmdet val dataset", "val_dataloader")):
        seconds, built = timed(lambda key=key: DATASETS.build(copy.deepcopy(cfg[key].dataset)))
        rows.append((f"{label} ({len(built)} images)", seconds))
    seconds, _ = timed(lambda: METRICS.build(copy.deepcopy(cfg.val_evaluator)))
    rows.append(("COCO metric (parses the val JSON)", seconds))
    return rows


def as_jpeg(root: Path) -> None:
    """Stores every rendered image as a JPEG of quality 90 and points both annotation files at them."""
    for split in ("train", "val"):
        doc = json.loads((root / f"{split}.json").read_text())
        for image in doc["images"]:
            png = root / "images" / image["file_name"]
            image["file_name"] = png.with_suffix(".jpg").name
            cv2.imwrite(str(png.with_suffix(".jpg")), cv2.imread(str(png)), [cv2.IMWRITE_JPEG_QUALITY, 90])
            png.unlink()
        (root / f"{split}.json").write_text(json.dumps(doc))


def check_seconds(root: Path, cache: Path) -> tuple[float, float, int]:
    """Seconds of the dataset check with an empty cache, then with the cache it left, and the images it decoded."""
    os.environ["XDG_CACHE_HOME"] = str(cache)
    cold = check_dataset(root, "big-train.json", "big-val.json")
    assert not cold.errors, cold.problem_lines()
    cached = check_dataset(root, "big-train.json", "big-val.json")
    assert cached.decoded == 0
    return cold.seconds, cached.seconds, cold.decoded


def decode_ms(images: Path) -> float:
    """Median milliseconds to read and decode one of the rendered image files in ``images``, as mmdet's
    LoadImageFromFile does."""
    files = sorted(p for p in images.iterdir() if p.is_file())
    times = []
    for index in range(DECODED):
        data = files[index % len(files)].read_bytes()
        times.append(timed(lambda data=data: mmcv.imfrombytes(data))[0])
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20000, help="train images (val: an eighth as many)")
    parser.add_argument("--size", type=int, default=640, help="image side in pixels")
    parser.add_argument("--format", choices=("png", "jpg"), default="png", help="image files (default png)")
    args = parser.parse_args()
    register_all_modules()
    with tempfile.TemporaryDirectory(prefix="dettune-bench-") as tmp:
        root = Path(tmp) / "data"
        write_dataset(root, images=RENDERED, size=args.size, seed=0)
        if args.format == "jpg":
            as_jpeg(root)
        replicate(root, "train", args.images)
        replicate(root, "val", max(1, args.images // 8))
        megabytes = (root / "big-train.json").stat().st_size / 1e6
        rows = opening_steps(root)
        per_image = decode_ms(root / "images")
        cold, cached, decoded = check_seconds(root, Path(tmp) / "cache")
    print(f"{args.images} train images ({megabytes:.0f} MB of annotations), {args.images // 8} val images, "
          f"{args.size} px {args.format}, {len(os.sched_getaffinity(0))} CPUs")
    for label, seconds in rows:
        print(f"  {label:<40} {seconds:6.2f} s")
    print(f"  {'opening, per trial':<40} {sum(s for _, s in rows):6.2f} s")
    print(f"  decoding one image: {per_image:.1f} ms; one epoch's images: {per_image * args.images / 1000:.0f} "
          f"CPU-seconds, paid alike with or without a search; kept decoded: "
          f"{args.images * args.size**2 * 3 / 2**30:.0f} GiB")
    print(f"  dataset check (every image decoded, every box checked): {cold:.1f} s cold ({decoded} images), "
          f"{cached:.1f} s cached")


if __name__ == "__main__":
    main()
