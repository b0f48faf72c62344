"""``dettune predict``: run an exported model (``dettune export``'s directory) on images.

For each image it writes the detections drawn on it (``OUTDIR/<image name>.png``); ``OUTDIR/predictions.json``
holds every image's boxes (``[x1, y1, x2, y2]`` in pixels), labels (class names) and scores above the threshold.
With ``--format submission`` it draws nothing and writes ``OUTDIR/submission.csv`` instead, the file the
trash-detection leaderboard takes: one row per image, ``PredictionString`` = ``label score xmin ymin xmax ymax``
for each box (label: the class index), ``image_id`` = the image's file name (for a COCO json of images, its
``file_name``). Images are files, folders of them, or COCO json files listing them.
It loads the model with mmdet's own ``DetInferencer`` and prints the speed it measured: batch 1, after one
warm-up, image loading and preprocessing included, drawing excluded.
"""

from __future__ import annotations

import argparse
import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import torch

from mmconfigs.build import load_config
from results.ensemble import ENSEMBLE_FILE, detect_with_ensemble, ensemble_member_dirs
from spaces.errors import BadArgument, NotFound
from trainers.checkpoint import CHECKPOINT_FILE, TRIAL_CONFIG, load_checkpoint
from trainers.inference import WARMUP_IMAGES, timed_inference

PREDICTIONS_FILE = "predictions.json"
SUBMISSION_FILE = "submission.csv"
SUBMISSION_HEADER = ("PredictionString", "image_id")
DEFAULT_SCORE_THR = 0.3
SUBMISSION_SCORE_THR = 0.0
"""A leaderboard's mAP rewards every box the model keeps: its own test-time threshold decides."""
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
FORMATS = ("drawn", "submission")


@dataclass(frozen=True)
class InputImage:
    """An image to predict on, and the name a submission gives it."""

    path: Path
    image_id: str


@dataclass(frozen=True, kw_only=True)
class Prediction:
    """One image's detections above the score threshold."""

    image: Path
    drawn: Path | None
    boxes: list[list[float]]
    labels: list[str]
    scores: list[float]

    def to_json(self) -> dict[str, Any]:
        return {"image": str(self.image), "drawn": str(self.drawn) if self.drawn else None, "boxes": self.boxes,
                "labels": self.labels,
                "scores": self.scores}


@dataclass(frozen=True, kw_only=True)
class Predicted:
    """What :func:`predict` did: the predictions, and the speed on which device."""

    predictions: list[Prediction]
    fps: float
    device: str
    classes: list[str]
    warmup: int = WARMUP_IMAGES
    """Untimed runs before the FPS was measured (an ensemble's figure times every image, none left out)."""


def predict(model_dir: Path, images: Sequence[Path], out: Path, *, score_thr: float = DEFAULT_SCORE_THR,
            device: str | None = None, draw: bool = True) -> Predicted:
    """Detects objects on ``images``, draws them into ``out`` (unless not ``draw``), writes ``out/predictions.json``.

    Args:
        model_dir: A directory written by ``dettune export``.
        images: Image files.
        out: Output directory.
        score_thr: Detections scoring below this are left out.
        device: Torch device (default: the GPU when there is one, else the CPU).
        draw: Whether to draw each image's detections into ``out``.

    Raises:
        NotFound: A missing model or image file; checked before the model loads.
        BadArgument: A threshold outside 0..1, or a device torch cannot use.
    """
    _check_inputs(model_dir, images, score_thr)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    _check_device(device)
    if (model_dir / ENSEMBLE_FILE).is_file():
        return _predict_ensemble(model_dir, images, out, score_thr=score_thr, device=device)
    from mmdet.apis import DetInferencer

    cfg = load_config(model_dir / TRIAL_CONFIG)
    cfg.visualizer.pop("vis_backends", None)  # the trial's file backend has no save_dir here; we save the PNGs
    inferencer = DetInferencer(model=cfg, weights=str(model_dir / CHECKPOINT_FILE), device=device,
                               show_progress=False)
    fps, samples = timed_inference(lambda path: inferencer(str(path), return_datasamples=True)["predictions"][0],
                                   [*[images[0]] * WARMUP_IMAGES, *images], warmup=WARMUP_IMAGES)
    out.mkdir(parents=True, exist_ok=True)
    classes = inferencer.model.dataset_meta["classes"]
    drawn_paths = _drawn_paths(out, images) if draw else [None] * len(images)
    predictions = [_prediction(inferencer, image, sample, classes, drawn, score_thr)
                   for image, sample, drawn in zip(images, samples, drawn_paths, strict=True)]
    (out / PREDICTIONS_FILE).write_text(json.dumps([p.to_json() for p in predictions], indent=2) + "\n",
                                        encoding="utf-8")
    return Predicted(predictions=predictions, fps=fps, device=device, classes=list(classes))


def _predict_ensemble(model_dir: Path, images: Sequence[Path], out: Path, *, score_thr: float,
                      device: str) -> Predicted:
    """An exported ensemble's fused boxes in ``out/predictions.json`` (nothing drawn: no one model draws them)."""
    classes = list(load_checkpoint(ensemble_member_dirs(model_dir)[0] / CHECKPOINT_FILE)
                   ["meta"]["dataset_meta"]["classes"])  # type: ignore[index]
    fused, fps = detect_with_ensemble(model_dir, images, device)
    kept = [d for d in fused if d["score"] >= score_thr]
    predictions = [Prediction(image=image, drawn=None,
                              boxes=[[round(v, 2) for v in (x, y, x + w, y + h)]
                                     for x, y, w, h in (d["bbox"] for d in kept if d["image_id"] == index)],
                              labels=[classes[d["category_id"]] for d in kept if d["image_id"] == index],
                              scores=[round(d["score"], 4) for d in kept if d["image_id"] == index])
                   for index, image in enumerate(images)]
    out.mkdir(parents=True, exist_ok=True)
    (out / PREDICTIONS_FILE).write_text(json.dumps([p.to_json() for p in predictions], indent=2) + "\n",
                                        encoding="utf-8")
    return Predicted(predictions=predictions, fps=fps, device=device, classes=classes, warmup=0)


def _check_inputs(model_dir: Path, images: Sequence[Path], score_thr: float) -> None:
    if (model_dir / ENSEMBLE_FILE).is_file():
        missing = [str(d) for d in ensemble_member_dirs(model_dir)
                   if not ((d / TRIAL_CONFIG).is_file() and (d / CHECKPOINT_FILE).is_file())]
        if missing:
            raise NotFound(f"the ensemble in {model_dir} lacks its members {', '.join(missing)}: export it again "
                           "with `dettune export NAME --ensemble RUN --out DIR`")
    elif not ((model_dir / TRIAL_CONFIG).is_file() and (model_dir / CHECKPOINT_FILE).is_file()):
        raise NotFound(f"{model_dir} is not an exported model (it needs {TRIAL_CONFIG} and {CHECKPOINT_FILE}): "
                         "write one with `dettune export NAME --out DIR`")
    missing = [str(image) for image in images if not image.is_file()]
    if missing:
        raise NotFound(f"no such image: {', '.join(missing)}: check the paths")
    if not 0.0 <= score_thr <= 1.0:
        raise BadArgument(f"--score-thr is {score_thr}, but must be between 0 and 1")


def _check_device(device: str) -> None:
    try:
        index = torch.device(device).index or 0
    except RuntimeError:
        raise BadArgument(f"--device {device} is not a torch device: use cpu, cuda or cuda:N") from None
    if device.startswith("cuda") and index >= torch.cuda.device_count():
        raise BadArgument(f"--device {device}, but torch {torch.__version__} sees {torch.cuda.device_count()} CUDA "
                         "devices: use --device cpu, or a GPU index that exists")


def _drawn_paths(out: Path, images: Sequence[Path]) -> list[Path]:
    """``out/<stem>.png`` per image, numbered where two images share a name."""
    paths: list[Path] = []
    for index, image in enumerate(images):
        path = out / f"{image.stem}.png"
        paths.append(path.with_stem(f"{image.stem}-{index}") if path in paths else path)
    return paths


def _prediction(inferencer: Any, image: Path, sample: Any, classes: Sequence[str], drawn: Path | None,
                score_thr: float) -> Prediction:
    instances = sample.pred_instances
    instances = instances[instances.scores >= score_thr].cpu()
    if drawn is not None:
        (canvas,) = inferencer.visualize([str(image)], [sample], return_vis=True, no_save_vis=True,
                                         pred_score_thr=score_thr)
        cv2.imwrite(str(drawn), cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR))
    return Prediction(image=image, drawn=drawn, boxes=[[round(float(v), 2) for v in box] for box in instances.bboxes],
                      labels=[classes[int(label)] for label in instances.labels],
                      scores=[round(float(s), 4) for s in instances.scores])


def input_images(paths: Sequence[Path], images_root: Path | None = None) -> list[InputImage]:
    """The images the arguments name: a file, each image file of a folder (sorted), or each image of a COCO json.

    A COCO json's ``file_name`` is relative to ``images_root`` (default: the json's folder).

    Raises:
        NotFound: A path that does not exist.
        BadArgument: A json that is not a COCO file with ``images``, or a folder without images.
    """
    found: list[InputImage] = []
    for path in paths:
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise BadArgument(f"{path} holds no image ({', '.join(IMAGE_SUFFIXES)}): name another folder")
            found += [InputImage(p, p.name) for p in files]
        elif path.suffix.lower() == ".json" and path.is_file():
            root = images_root or path.parent
            found += [InputImage(root / name, name) for name in _coco_file_names(path)]
        else:
            found.append(InputImage(path, path.name))
    return found


def _coco_file_names(path: Path) -> list[str]:
    try:
        images = json.loads(path.read_text(encoding="utf-8"))["images"]
        return [str(image["file_name"]) for image in images]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise BadArgument(f"{path} is not a COCO json with an images list of file_name entries: pass image "
                          "files, a folder of them, or a COCO json (its test.json)") from None


def write_submission(path: Path, predicted: Predicted, image_ids: Sequence[str]) -> Path:
    """The leaderboard's CSV: one row per image, its boxes as ``label score xmin ymin xmax ymax ...``."""
    index = {name: i for i, name in enumerate(predicted.classes)}
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(SUBMISSION_HEADER)
        for prediction, image_id in zip(predicted.predictions, image_ids, strict=True):
            boxes = zip(prediction.labels, prediction.scores, prediction.boxes, strict=True)
            writer.writerow([" ".join(f"{index[label]} {score} {' '.join(str(v) for v in box)}"
                                      for label, score, box in boxes), image_id])
    return path


# --- command line ---------------------------------------------------------------------------------------

def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Adds ``dettune predict DIR IMAGE... [--out OUTDIR] [--format drawn|submission] [--score-thr T] ...``."""
    parser = commands.add_parser("predict", help="detect objects on images with an exported model")
    parser.add_argument("model_dir", metavar="DIR", help="a directory written by `dettune export`")
    parser.add_argument("images", metavar="IMAGE", nargs="+", help="image files, folders of them, or COCO json "
                                                                   "files listing them")
    parser.add_argument("--images-root", help="the folder a COCO json's file_name entries are relative to "
                                              "(default: the json's folder)")
    parser.add_argument("--format", choices=FORMATS, default="drawn",
                        help=f"drawn: <image>.png per image and {PREDICTIONS_FILE} (default); submission: "
                             f"{SUBMISSION_FILE} for the leaderboard (and {PREDICTIONS_FILE}), nothing drawn")
    parser.add_argument("--out", default="predictions",
                        help="output directory: <image>.png per image and predictions.json (default: predictions)")
    parser.add_argument("--score-thr", type=float,
                        help=f"keep detections scoring at least this, 0..1 (default {DEFAULT_SCORE_THR}; for a "
                             f"submission {SUBMISSION_SCORE_THR}: every box the model keeps)")
    parser.add_argument("--device", help="torch device to run on, e.g. cpu, cuda:1 (default: cuda when torch "
                                         "sees a GPU, else cpu)")
    parser.set_defaults(handler=run_predict)


def run_predict(args: argparse.Namespace) -> int:
    """The ``predict`` command."""
    submission = args.format == "submission"
    images = input_images([Path(p) for p in args.images], Path(args.images_root) if args.images_root else None)
    default_thr = SUBMISSION_SCORE_THR if submission else DEFAULT_SCORE_THR
    done = predict(Path(args.model_dir), [image.path for image in images], Path(args.out), device=args.device,
                   score_thr=default_thr if args.score_thr is None else args.score_thr, draw=not submission)
    found = sum(len(p.labels) for p in done.predictions)
    print(f"{found} detections on {len(done.predictions)} images, written to {args.out}")
    if submission:
        path = write_submission(Path(args.out) / SUBMISSION_FILE, done, [image.image_id for image in images])
        print(f"submission: {path}")
    warmed = f"after {done.warmup} warm-up runs" if done.warmup else "all members and the fusion, no warm-up"
    print(f"inference: {done.fps:.1f} FPS (batch 1, {done.device}, {warmed})")
    return 0
