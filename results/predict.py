"""``dettune predict``: run an exported model (``dettune export``'s directory) on images.

For each image it writes the detections drawn on it (``OUTDIR/<image name>.png``); ``OUTDIR/predictions.json``
holds every image's boxes (``[x1, y1, x2, y2]`` in pixels), labels (class names) and scores above the threshold.
It loads the model with mmdet's own ``DetInferencer`` and prints the speed it measured: batch 1, after one
warm-up, image loading and preprocessing included, drawing excluded.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import torch

from mmconfigs.build import load_config
from spaces.errors import BadArgument, NotFound
from trainers.checkpoint import CHECKPOINT_FILE, TRIAL_CONFIG
from trainers.inference import WARMUP_IMAGES, timed_inference

PREDICTIONS_FILE = "predictions.json"
DEFAULT_SCORE_THR = 0.3


@dataclass(frozen=True, kw_only=True)
class Prediction:
    """One image's detections above the score threshold."""

    image: Path
    drawn: Path
    boxes: list[list[float]]
    labels: list[str]
    scores: list[float]

    def to_json(self) -> dict[str, Any]:
        return {"image": str(self.image), "drawn": str(self.drawn), "boxes": self.boxes, "labels": self.labels,
                "scores": self.scores}


@dataclass(frozen=True, kw_only=True)
class Predicted:
    """What :func:`predict` did: the predictions, and the speed on which device."""

    predictions: list[Prediction]
    fps: float
    device: str


def predict(model_dir: Path, images: Sequence[Path], out: Path, *, score_thr: float = DEFAULT_SCORE_THR,
            device: str | None = None) -> Predicted:
    """Detects objects on ``images``, draws them into ``out`` and writes ``out/predictions.json``.

    Args:
        model_dir: A directory written by ``dettune export``.
        images: Image files.
        out: Output directory.
        score_thr: Detections scoring below this are left out.
        device: Torch device (default: the GPU when there is one, else the CPU).

    Raises:
        NotFound: A missing model or image file; checked before the model loads.
        BadArgument: A threshold outside 0..1, or a device torch cannot use.
    """
    _check_inputs(model_dir, images, score_thr)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    _check_device(device)
    from mmdet.apis import DetInferencer

    cfg = load_config(model_dir / TRIAL_CONFIG)
    cfg.visualizer.pop("vis_backends", None)  # the trial's file backend has no save_dir here; we save the PNGs
    inferencer = DetInferencer(model=cfg, weights=str(model_dir / CHECKPOINT_FILE), device=device,
                               show_progress=False)
    fps, samples = timed_inference(lambda path: inferencer(str(path), return_datasamples=True)["predictions"][0],
                                   [*[images[0]] * WARMUP_IMAGES, *images], warmup=WARMUP_IMAGES)
    out.mkdir(parents=True, exist_ok=True)
    classes = inferencer.model.dataset_meta["classes"]
    predictions = [_prediction(inferencer, image, sample, classes, drawn, score_thr)
                   for image, sample, drawn in zip(images, samples, _drawn_paths(out, images), strict=True)]
    (out / PREDICTIONS_FILE).write_text(json.dumps([p.to_json() for p in predictions], indent=2) + "\n",
                                        encoding="utf-8")
    return Predicted(predictions=predictions, fps=fps, device=device)


def _check_inputs(model_dir: Path, images: Sequence[Path], score_thr: float) -> None:
    if not ((model_dir / TRIAL_CONFIG).is_file() and (model_dir / CHECKPOINT_FILE).is_file()):
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


def _prediction(inferencer: Any, image: Path, sample: Any, classes: Sequence[str], drawn: Path,
                score_thr: float) -> Prediction:
    instances = sample.pred_instances
    instances = instances[instances.scores >= score_thr].cpu()
    (canvas,) = inferencer.visualize([str(image)], [sample], return_vis=True, no_save_vis=True,
                                     pred_score_thr=score_thr)
    cv2.imwrite(str(drawn), cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR))
    return Prediction(image=image, drawn=drawn, boxes=[[round(float(v), 2) for v in box] for box in instances.bboxes],
                      labels=[classes[int(label)] for label in instances.labels],
                      scores=[round(float(s), 4) for s in instances.scores])


# --- command line ---------------------------------------------------------------------------------------

def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Adds ``dettune predict DIR IMAGE... [--out OUTDIR] [--score-thr T] [--device D]``."""
    parser = commands.add_parser("predict", help="detect objects on images with an exported model")
    parser.add_argument("model_dir", metavar="DIR", help="a directory written by `dettune export`")
    parser.add_argument("images", metavar="IMAGE", nargs="+", help="image files")
    parser.add_argument("--out", default="predictions",
                        help="output directory: <image>.png per image and predictions.json (default: predictions)")
    parser.add_argument("--score-thr", type=float, default=DEFAULT_SCORE_THR,
                        help=f"keep detections scoring at least this, 0..1 (default {DEFAULT_SCORE_THR})")
    parser.add_argument("--device", help="torch device to run on, e.g. cpu, cuda:1 (default: cuda when torch "
                                         "sees a GPU, else cpu)")
    parser.set_defaults(handler=run_predict)


def run_predict(args: argparse.Namespace) -> int:
    """The ``predict`` command."""
    done = predict(Path(args.model_dir), [Path(p) for p in args.images], Path(args.out), score_thr=args.score_thr,
                   device=args.device)
    found = sum(len(p.labels) for p in done.predictions)
    print(f"{found} detections on {len(done.predictions)} images, written to {args.out}")
    print(f"inference: {done.fps:.1f} FPS (batch 1, {done.device}, after {WARMUP_IMAGES} warm-up runs)")
    return 0
