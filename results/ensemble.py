"""``dettune ensemble``: the search's best trials fused box by box, scored on images that chose nothing.

1. **Members.** The trials with a checkpoint still in Ray storage, ranked as ``dettune export`` ranks them (each
   trial by its best checkpoint on disk); the top K.
2. **Predictions, once.** Each member runs on the whole val set once; its detections are cached as a COCO result
   file in the search's Ray experiment directory (``ensemble/<trial id>-epoch_<n>.bbox.json``), so a later call
   with other settings runs no model.
3. **Two fixed halves.** Val's image ids, sorted: those at even positions (1st, 3rd, ...) are the *selection*
   half, those at odd positions the *held-out* half. The same val set always splits the same way.
4. **Selection** on the selection half: greedy forward selection with replacement (Caruana et al., "Ensemble
   selection from libraries of models", ICML 2004): start empty, add the member that most improves the fused
   score, stop when none does; a member added twice weighs twice, and one member alone is its own predictions.
   This runs once per setting of a small grid of ``iou_thr`` x ``skip_box_thr``; the best fused score wins.
   With ``--tta`` each trial is a candidate twice: as it is, and with test-time augmentation (its own test
   pipeline under mmdet's ``TestTimeAug``: the trial's scale and one step (x1.25) either side, each flipped
   horizontally and not, merged by ``DetTTAModel``), so a trial's TTA joins only where it helps.
   Boxes are fused with mmdet's Weighted Boxes Fusion (Solovyev et al., arXiv 1910.13302) or, with
   ``--fusion nms``, by class-wise NMS over every member's boxes (scores scaled by the member's weight).
5. **Scores** on the held-out half, with pycocotools: the experiment log's mAP columns of the ensemble and of the
   best single trial (the one ``dettune export`` exports; with ``--tta`` also that trial with TTA), logged as
   one MLflow run (role ``ensemble``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow.artifacts
import torch
from mlflow.entities import Run
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from mmconfigs.build import load_config
from results.export import (
    Candidate,
    NothingToExport,
    checkpoint_candidates,
    experiment_dir,
    metric_mode,
    ranked_candidates,
    write_model,
)
from results.report import format_value
from results.store import SearchHandle, add_tracking_flag, open_search, open_tracking
from spaces.errors import BadArgument, NotFound
from spaces.objectives import FPS_METRIC, GFLOPS_METRIC, PARAMS_METRIC
from tracking_names import (
    DEFAULT_STORAGE,
    ROLE_ENSEMBLE,
    TAG_EXP_NUM,
    TAG_ROLE,
    TAG_SEARCH,
    find_runs,
)
from tracking_names.storage import Storage, tracking_uri_for
from trainers.checkpoint import CHECKPOINT_FILE, TRIAL_CONFIG, load_checkpoint
from trainers.coco_metric import STATS_INDEX
from trainers.metrics import val_metrics

CACHE_DIR = "ensemble"
"""Where the members' val predictions are cached, inside the search's Ray experiment directory."""
FUSIONS = ("wbf", "nms")
IOU_GRID = (0.5, 0.6, 0.7)
SKIP_BOX_GRID = (0.0, 0.1)
MAP_COLUMNS = tuple(f"val/bbox_{item}" for item in STATS_INDEX)
SINGLE_PREFIX = "single/"
"""The best single trial's held-out scores on the ensemble's run: ``single/val/bbox_mAP``."""
SUMMED_COSTS = (GFLOPS_METRIC, PARAMS_METRIC)
ENSEMBLE_FILE = "ensemble.json"
SPLIT_RULE = "val image ids sorted; even positions select, odd positions are held out"
TTA_SCALE_STEP = 1.25
"""TTA's scales: the trial's test scale divided and multiplied by this, and the scale itself."""
TTA_CFG = {"nms": {"type": "nms", "iou_threshold": 0.5}, "max_per_img": 100}
"""How ``DetTTAModel`` merges the views' boxes (mmdet's TTA configs use the same)."""
SINGLE_TTA_PREFIX = "single_tta/"

Detection = dict[str, Any]
"""One box in COCO's result format: ``image_id``, ``category_id``, ``bbox`` (x, y, w, h), ``score``."""
ByImage = Mapping[int, Sequence[Detection]]


class NoMembers(NothingToExport):
    """The search has no trial checkpoint left to ensemble."""


class NoTTA(BadArgument):
    """A trial's test pipeline has no ``Resize`` with a ``scale`` to vary."""


@dataclass(frozen=True, kw_only=True)
class Member:
    """A trial's best checkpoint on disk, and its MLflow run."""

    exp_num: str
    run_id: str
    candidate: Candidate


@dataclass(frozen=True)
class Variant:
    """A member as it is, or with test-time augmentation: one candidate of the selection."""

    member: Member
    tta: bool = False

    @property
    def name(self) -> str:
        return self.member.exp_num + ("+tta" if self.tta else "")

    @property
    def cache_name(self) -> str:
        candidate = self.member.candidate
        return f"{candidate.trial_id}-epoch_{candidate.epoch}{'.tta' if self.tta else ''}.bbox.json"


@dataclass(frozen=True)
class Fusion:
    """How boxes of several members become one set."""

    method: str
    iou_thr: float
    skip_box_thr: float


@dataclass(frozen=True, kw_only=True)
class Ensemble:
    """What :func:`build_ensemble` chose and scored."""

    variants: list[Variant]
    """Every candidate, best ranked first (with TTA: then each with TTA); ``weights`` says which are in."""
    weights: tuple[int, ...]
    fusion: Fusion
    metric: str
    selection: list[int]
    held_out: list[int]
    selection_score: float
    scores: dict[str, float]
    single: dict[str, float]
    single_tta: dict[str, float] | None
    fps: float
    """Val images per second of every chosen variant's test step plus the fusion: each variant runs once."""
    single_fps: float
    single_tta_fps: float | None

    @property
    def chosen(self) -> list[tuple[Variant, int]]:
        return [(v, w) for v, w in zip(self.variants, self.weights, strict=True) if w > 0]


# --- members and their cached predictions ---------------------------------------------------------------

def pick_members(search: SearchHandle, top_k: int) -> list[Member]:
    """The ``top_k`` best trials that still have a checkpoint, each at its best one, ranked as export ranks them.

    Raises:
        NoMembers: No trial checkpoint is on disk.
    """
    directory = experiment_dir(search)
    candidates = checkpoint_candidates(directory)
    if not candidates:
        raise NoMembers(f"no trial of {search.name} has a checkpoint left in {directory} (Ray keeps each trial's "
                        "best two; a trial writes its first after epoch 1): wait for the first epoch, or run the "
                        "search again")
    metric = search.space.metric
    best: dict[str, Candidate] = {}
    for candidate in ranked_candidates(candidates, metric, metric_mode(search.space, metric)):
        best.setdefault(candidate.trial_id, candidate)
    members = []
    for candidate in list(best.values())[:top_k]:
        run = search.run_of(candidate.trial_id)
        members.append(Member(exp_num=run.data.tags.get(TAG_EXP_NUM, run.info.run_id), run_id=run.info.run_id,
                              candidate=candidate))
    return members


def cached_predictions(variant: Variant, cache: Storage, device: str) -> tuple[list[Detection], float]:
    """The variant's detections on the whole val set and its seconds per image: read from ``cache``, or
    computed once and written there (the time beside the predictions, as ``<...>.seconds.json``)."""
    path = cache / variant.cache_name
    timing = cache / (variant.cache_name.removesuffix(".bbox.json") + ".seconds.json")
    text = path.read_text()
    if text is None:
        detections, seconds = predict_val(variant.member.candidate.directory, device, tta=variant.tta)
        timing.write_text(json.dumps({"seconds_per_image": seconds, "device": device}))  # each file whole
        text = json.dumps(detections)
        path.write_text(text)  # last: a cache file means both are there
    loaded: list[Detection] = json.loads(text)
    return loaded, float(json.loads(timing.read_text() or "{}")["seconds_per_image"])


def predict_val(checkpoint_dir: Path, device: str, *, tta: bool = False) -> tuple[list[Detection], float]:
    """Runs a trial checkpoint on its own val set (the trial's config: same images, same test pipeline).

    With ``tta`` the pipeline is :func:`tta_pipeline` of the trial's and the model is wrapped in ``DetTTAModel``.
    Also returns the seconds per image of the model's test step (loading left out, as a trial's
    ``inference/fps``), after one untimed warm-up call.
    """
    from mmdet.registry import DATASETS
    from mmdet.utils import register_all_modules
    from mmengine.dataset import pseudo_collate
    from mmengine.registry import DefaultScope

    register_all_modules(init_default_scope=False)
    cfg = load_config(checkpoint_dir / TRIAL_CONFIG)
    dataset_cfg = cfg.val_dataloader.dataset
    if tta:
        dataset_cfg.pipeline = tta_pipeline(dataset_cfg.pipeline)
    with DefaultScope.overwrite_default_scope("mmdet"), contextlib.redirect_stdout(io.StringIO()):
        dataset = DATASETS.build(dataset_cfg)  # pycocotools prints while it loads
    model = load_model(checkpoint_dir, device, tta=tta)
    detections: list[Detection] = []
    seconds = 0.0
    with torch.no_grad():
        model.test_step(pseudo_collate([dataset[0]]))  # warm-up: lazy initialisation, not inference
        for index in range(len(dataset)):
            batch = pseudo_collate([dataset[index]])
            start = time.perf_counter()
            (sample,) = model.test_step(batch)
            seconds += time.perf_counter() - start
            detections.extend(coco_detections(sample, dataset.cat_ids))
    return detections, seconds / max(len(dataset), 1)


def load_model(checkpoint_dir: Path, device: str, *, tta: bool) -> Any:
    """A checkpoint's detector in eval mode on ``device``; with ``tta`` inside ``DetTTAModel``."""
    from mmdet.models.test_time_augs import DetTTAModel
    from mmdet.registry import MODELS
    from mmengine.config import ConfigDict
    from mmengine.registry import DefaultScope

    cfg = load_config(checkpoint_dir / TRIAL_CONFIG)
    with DefaultScope.overwrite_default_scope("mmdet"):
        model = MODELS.build(cfg.model)
    model.load_state_dict(load_checkpoint(checkpoint_dir / CHECKPOINT_FILE)["state_dict"])
    if tta:
        model = DetTTAModel(module=model, tta_cfg=ConfigDict(TTA_CFG))  # it reads the settings as attributes
    return model.to(device).eval()


def detect_images(checkpoint_dir: Path, images: Sequence[Path], device: str, *,
                  tta: bool) -> tuple[list[Detection], float]:
    """A checkpoint's detections on image files, as :func:`predict_val` finds them on val (its val pipeline
    without annotations), and the seconds the images took (the model's loading left out); ``image_id`` is the
    image's index in ``images``, ``category_id`` the class index."""
    from mmcv.transforms import Compose
    from mmdet.utils import register_all_modules
    from mmengine.dataset import pseudo_collate
    from mmengine.registry import DefaultScope

    register_all_modules(init_default_scope=False)
    steps = [dict(step) for step in load_config(checkpoint_dir / TRIAL_CONFIG).val_dataloader.dataset.pipeline
             if step.get("type") != "LoadAnnotations"]
    with DefaultScope.overwrite_default_scope("mmdet"):
        pipeline = Compose(tta_pipeline(steps) if tta else steps)
    model = load_model(checkpoint_dir, device, tta=tta)
    detections: list[Detection] = []
    start = time.perf_counter()
    with torch.no_grad():
        for index, path in enumerate(images):
            (sample,) = model.test_step(pseudo_collate([pipeline({"img_path": str(path), "img_id": index})]))
            detections.extend(coco_detections(sample))
    return detections, time.perf_counter() - start


def coco_detections(sample: Any, cat_ids: Sequence[int] | None = None) -> list[Detection]:
    """An mmdet ``DetDataSample``'s boxes (in the original image's pixels) as COCO results; ``category_id`` is
    ``cat_ids[label]``, or the class index itself without ``cat_ids``."""
    instances = sample.pred_instances.cpu()
    return [{"image_id": int(sample.img_id), "category_id": int(cat_ids[label] if cat_ids else label),
             "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score}
            for (x1, y1, x2, y2), score, label in zip(instances.bboxes.tolist(), instances.scores.tolist(),
                                                      instances.labels.tolist(), strict=True)]


def tta_pipeline(pipeline: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The trial's test pipeline with its ``Resize`` and what follows under mmdet's ``TestTimeAug``.

    The views: the trial's scale, divided and multiplied by :data:`TTA_SCALE_STEP`, each flipped horizontally
    and not; ``PackDetInputs`` keeps the flip in the metadata, so ``DetTTAModel`` flips those boxes back.

    Raises:
        NoTTA: No ``Resize`` with a ``scale``, or the pipeline does not end with ``PackDetInputs``.
    """
    steps = [dict(step) for step in pipeline]
    resize = next((i for i, step in enumerate(steps) if step.get("type") == "Resize" and "scale" in step), None)
    if resize is None or steps[-1].get("type") != "PackDetInputs":
        raise NoTTA("--tta varies the scale of a test pipeline's Resize and keeps the flip in PackDetInputs, but "
                    f"this trial's val pipeline is {[step.get('type') for step in steps]}: leave out --tta")
    width, height = steps[resize]["scale"]
    scales = [(round(width * f), round(height * f)) for f in (1 / TTA_SCALE_STEP, 1.0, TTA_SCALE_STEP)]
    pack = steps[-1]
    meta_keys = tuple(pack.get("meta_keys", ())) + ("flip", "flip_direction")
    return [*steps[:resize], {"type": "TestTimeAug", "transforms": [
        [{**steps[resize], "scale": scale} for scale in scales],
        [{"type": "RandomFlip", "prob": 1.0, "direction": "horizontal"}, {"type": "RandomFlip", "prob": 0.0}],
        *[[step] for step in steps[resize + 1:-1]],
        [{**pack, "meta_keys": meta_keys}]]}]


def val_annotations(member: Member) -> Path:
    """The COCO annotation file the trial was scored against."""
    cfg = load_config(member.candidate.directory / TRIAL_CONFIG)
    return Path(cfg.val_evaluator.ann_file)


# --- the split, the score, the fusion -------------------------------------------------------------------

def split_halves(image_ids: Sequence[int]) -> tuple[list[int], list[int]]:
    """(selection, held-out): the sorted ids at even positions, and those at odd positions."""
    ordered = sorted(image_ids)
    return ordered[0::2], ordered[1::2]


def load_ground_truth(path: Path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        return COCO(str(path))


def coco_scores(ground_truth: COCO, detections: Sequence[Detection], image_ids: Sequence[int]) -> dict[str, float]:
    """The log's mAP columns of ``detections`` on ``image_ids`` (COCO's -1, no object of that size, left out)."""
    wanted = set(image_ids)
    kept = [dict(d) for d in detections if d["image_id"] in wanted]  # loadRes writes into the dicts it gets
    if not kept:  # loadRes refuses an empty list; detecting nothing scores 0
        return {column: 0.0 for column in MAP_COLUMNS}
    with contextlib.redirect_stdout(io.StringIO()):
        evaluation = COCOeval(ground_truth, ground_truth.loadRes(kept), "bbox")
        evaluation.params.imgIds = sorted(wanted)
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return val_metrics({f"bbox_{item}": float(evaluation.stats[index]) for item, index in STATS_INDEX.items()})


def by_image(detections: Sequence[Detection]) -> dict[int, list[Detection]]:
    grouped: dict[int, list[Detection]] = {}
    for detection in detections:
        grouped.setdefault(int(detection["image_id"]), []).append(detection)
    return grouped


def fuse(predictions: Sequence[ByImage], weights: Sequence[int], fusion: Fusion,
         image_ids: Sequence[int]) -> list[Detection]:
    """The fused detections on ``image_ids`` of the members with a weight above 0; one member is left as it is."""
    chosen = [(p, w) for p, w in zip(predictions, weights, strict=True) if w > 0]
    if len(chosen) == 1:
        return [d for image_id in image_ids for d in chosen[0][0].get(image_id, ())]
    fused: list[Detection] = []
    for image_id in image_ids:
        per_member = [p.get(image_id, ()) for p, _ in chosen]
        boxes, scores, labels = _fuse_image(per_member, [w for _, w in chosen], fusion)
        fused.extend({"image_id": image_id, "category_id": int(label), "bbox": [x1, y1, x2 - x1, y2 - y1],
                      "score": float(score)}
                     for (x1, y1, x2, y2), score, label in zip(boxes, scores, labels, strict=True))
    return fused


def corners(bbox: Sequence[float]) -> list[float]:
    """COCO's (x, y, w, h) as (x1, y1, x2, y2)."""
    x, y, w, h = bbox
    return [x, y, x + w, y + h]


def _fuse_image(per_member: Sequence[Sequence[Detection]], weights: Sequence[int],
                fusion: Fusion) -> tuple[list[list[float]], list[float], list[int]]:
    boxes = [[corners(d["bbox"]) for d in dets] for dets in per_member]
    scores = [[float(d["score"]) for d in dets] for dets in per_member]
    labels = [[int(d["category_id"]) for d in dets] for dets in per_member]
    if fusion.method == "wbf":
        from mmdet.models.utils import weighted_boxes_fusion

        fused = weighted_boxes_fusion(boxes, scores, labels, weights=list(weights), iou_thr=fusion.iou_thr,
                                      skip_box_thr=fusion.skip_box_thr)
        return fused[0].tolist(), fused[1].tolist(), [int(v) for v in fused[2].tolist()]
    return _nms(boxes, scores, labels, weights, fusion)


def _nms(boxes: Sequence[Sequence[list[float]]], scores: Sequence[Sequence[float]], labels: Sequence[Sequence[int]],
         weights: Sequence[int], fusion: Fusion) -> tuple[list[list[float]], list[float], list[int]]:
    """Class-wise NMS over every member's boxes, each score scaled by its member's weight over the largest."""
    from mmcv.ops import batched_nms

    top = max(weights)
    flat = [(b, s * w / top, c) for bs, ss, cs, w in zip(boxes, scores, labels, weights, strict=True)
            for b, s, c in zip(bs, ss, cs, strict=True) if s * w / top >= fusion.skip_box_thr]
    if not flat:
        return [], [], []
    kept, keep = batched_nms(torch.tensor([b for b, _, _ in flat], dtype=torch.float32),
                             torch.tensor([s for _, s, _ in flat], dtype=torch.float32),
                             torch.tensor([c for _, _, c in flat]),
                             {"type": "nms", "iou_threshold": fusion.iou_thr})
    return kept[:, :4].tolist(), kept[:, 4].tolist(), [flat[i][2] for i in keep.tolist()]


# --- selection -------------------------------------------------------------------------------------------

def greedy_selection(score: Callable[[tuple[int, ...]], float], count: int,
                     max_steps: int) -> tuple[tuple[int, ...], float]:
    """Greedy forward selection with replacement: the weights (times each member was added) and their score.

    Each step adds the member whose addition scores best (the better ranked among equals); it stops when no
    addition beats the current score, or after ``max_steps`` additions.
    """
    weights, best = (0,) * count, -math.inf
    for _ in range(max_steps):
        options = [tuple(w + (i == j) for j, w in enumerate(weights)) for i in range(count)]
        scored = [(score(option), option) for option in options]
        top_score, top = max(scored, key=lambda pair: pair[0])  # max keeps the first of equals
        if top_score <= best:
            break
        weights, best = top, top_score
    return weights, best


def select(predictions: Sequence[ByImage], ground_truth: COCO, selection: Sequence[int], metric: str,
           method: str) -> tuple[tuple[int, ...], Fusion, float]:
    """Members, weights and fusion settings with the best fused ``metric`` on the selection half."""
    memo: dict[tuple[tuple[int, ...], Fusion | None], float] = {}

    def score_with(fusion: Fusion) -> Callable[[tuple[int, ...]], float]:
        def score(weights: tuple[int, ...]) -> float:
            alone = sum(w > 0 for w in weights) == 1  # then the same under every weight and fusion setting
            key = (tuple(min(w, 1) for w in weights), None) if alone else (weights, fusion)
            if key not in memo:
                fused = fuse(predictions, weights, fusion, selection)
                memo[key] = coco_scores(ground_truth, fused, selection).get(metric, 0.0)
            return memo[key]
        return score

    count = len(predictions)
    options = [(*greedy_selection(score_with(fusion), count, max_steps=2 * count), fusion)
               for fusion in (Fusion(method, iou, skip) for iou in IOU_GRID for skip in SKIP_BOX_GRID)]
    weights, value, fusion = max(options, key=lambda option: option[1])  # max keeps the first of equals
    return weights, fusion, value


def selection_metric(search: SearchHandle) -> str:
    """The space's metric where it is one of the mAP columns, else ``val/bbox_mAP``."""
    return search.space.metric if search.space.metric in MAP_COLUMNS else MAP_COLUMNS[0]


def build_ensemble(search: SearchHandle, *, top_k: int, method: str = "wbf", tta: bool = False,
                   device: str | None = None) -> Ensemble:
    """Chooses and scores the ensemble of the search's ``top_k`` best trials (see the module's steps).

    Raises:
        BadArgument: ``top_k`` below 1, or an unknown fusion.
        NoMembers: No trial checkpoint left.
        NoTTA: ``tta`` for a trial whose test pipeline it cannot vary.
    """
    if top_k < 1:
        raise BadArgument(f"--top-k is {top_k}, but must be at least 1: pass how many of the best trials may join")
    if method not in FUSIONS:
        raise BadArgument(f"--fusion is {method!r}, but must be one of {', '.join(FUSIONS)}")
    members = pick_members(search, top_k)
    if tta:  # refused before any model runs
        for member in members:
            tta_pipeline(load_config(member.candidate.directory / TRIAL_CONFIG).val_dataloader.dataset.pipeline)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cache = experiment_dir(search) / CACHE_DIR
    variants = [Variant(m) for m in members] + ([Variant(m, tta=True) for m in members] if tta else [])
    cached = [cached_predictions(variant, cache, device) for variant in variants]
    raw = [detections for detections, _ in cached]
    predictions = [by_image(detections) for detections in raw]
    ground_truth = load_ground_truth(val_annotations(members[0]))
    selection, held_out = split_halves(ground_truth.getImgIds())
    if not held_out:
        raise NoMembers(f"the val set of {search.name} has {len(selection)} image: an honest score needs at "
                        "least 2 (one half chooses, the other scores)")
    metric = selection_metric(search)
    weights, fusion, selection_score = select(predictions, ground_truth, selection, metric, method)
    single_tta = coco_scores(ground_truth, raw[len(members)], held_out) if tta else None
    start = time.perf_counter()
    fuse(predictions, weights, fusion, ground_truth.getImgIds())
    fusing = (time.perf_counter() - start) / len(ground_truth.getImgIds())
    running = sum(seconds for (_, seconds), weight in zip(cached, weights, strict=True) if weight > 0)
    return Ensemble(variants=variants, weights=weights, fusion=fusion, metric=metric, selection=selection,
                    fps=1.0 / (running + fusing), single_fps=1.0 / cached[0][1],
                    single_tta_fps=1.0 / cached[len(members)][1] if tta else None,
                    held_out=held_out, selection_score=selection_score,
                    scores=coco_scores(ground_truth, fuse(predictions, weights, fusion, held_out), held_out),
                    single=coco_scores(ground_truth, raw[0], held_out), single_tta=single_tta)


# --- MLflow ---------------------------------------------------------------------------------------------

def log_ensemble(search: SearchHandle, ensemble: Ensemble, top_k: int, out: Path) -> str:
    """One run in the search's experiment (role ``ensemble``, nested under the search); returns its name.

    ``out`` receives ``ensemble.json`` (members, checkpoints, weights, fusion, split), logged as an artifact.
    """
    client = search.client
    tags = {TAG_SEARCH: search.name, TAG_ROLE: ROLE_ENSEMBLE}
    name = f"{search.name}-ensemble-{len(find_runs(client, search.experiment_id, tags)) + 1}"
    run_id = client.create_run(search.experiment_id, run_name=name,
                               tags={**tags, MLFLOW_PARENT_RUN_ID: search.parent.info.run_id}).info.run_id
    chosen = ensemble.chosen
    params = {"members": ",".join(v.name for v, _ in chosen), "weights": ",".join(str(w) for _, w in chosen),
              "fusion": ensemble.fusion.method, "fusion.iou_thr": ensemble.fusion.iou_thr,
              "fusion.skip_box_thr": ensemble.fusion.skip_box_thr, "top_k": top_k, "selected_by": ensemble.metric,
              "split": SPLIT_RULE, "images.selection": len(ensemble.selection),
              "images.held_out": len(ensemble.held_out), "single": ensemble.variants[0].name,
              "tta": "on" if ensemble.single_tta is not None else "off"}
    for key, value in params.items():
        client.log_param(run_id, key, value)
    costs = _summed_costs(search, list({v.member.run_id: v.member for v, _ in chosen}.values()))
    metrics = {**ensemble.scores, **{SINGLE_PREFIX + k: v for k, v in ensemble.single.items()},
               FPS_METRIC: ensemble.fps, SINGLE_PREFIX + FPS_METRIC: ensemble.single_fps,
               **({SINGLE_TTA_PREFIX + FPS_METRIC: ensemble.single_tta_fps} if ensemble.single_tta_fps else {}),
               **{SINGLE_TTA_PREFIX + k: v for k, v in (ensemble.single_tta or {}).items()}, **costs}
    for key, value in metrics.items():
        client.log_metric(run_id, key, value)
    out.mkdir(parents=True, exist_ok=True)
    path = out / ENSEMBLE_FILE
    path.write_text(json.dumps(_description(ensemble, name), indent=2) + "\n", encoding="utf-8")
    client.log_artifact(run_id, str(path))
    client.set_terminated(run_id)
    return name


def _summed_costs(search: SearchHandle, members: Sequence[Member]) -> dict[str, float]:
    """GFLOPs and parameters of every member together, where each member's run holds them."""
    runs = {record.run_id: record for record in search.trials()}
    summed = {}
    for cost in SUMMED_COSTS:
        values = [runs[m.run_id].latest(cost) for m in members if m.run_id in runs]
        if values and all(v is not None for v in values):
            summed[cost] = float(sum(v for v in values if v is not None))
    return summed


def _description(ensemble: Ensemble, name: str) -> dict[str, Any]:
    return {"run_name": name,
            "members": [{"exp_num": v.member.exp_num, "tta": v.tta, "mlflow_run_id": v.member.run_id,
                         "trial_id": v.member.candidate.trial_id, "epoch": v.member.candidate.epoch, "weight": w,
                         "predictions": f"{CACHE_DIR}/{v.cache_name}"}
                        for v, w in ensemble.chosen],
            "fusion": {"method": ensemble.fusion.method, "iou_thr": ensemble.fusion.iou_thr,
                       "skip_box_thr": ensemble.fusion.skip_box_thr},
            "selected_by": ensemble.metric, "selection_score": ensemble.selection_score,
            "split": {"rule": SPLIT_RULE, "selection": ensemble.selection, "held_out": ensemble.held_out},
            "held_out": {"ensemble": ensemble.scores, "single": ensemble.single, "single_tta": ensemble.single_tta}}


# --- export: a directory `dettune predict` runs -----------------------------------------------------------

MEMBERS_DIR = "members"


def find_ensemble_run(search: SearchHandle, ref: str) -> Run:
    """The search's ensemble run named ``ref`` (its run name, ``<search>-ensemble-<n>``, or its run id).

    Raises:
        NotFound: No ensemble run of the search is called that (a trial's run is not one).
    """
    runs = find_runs(search.client, search.experiment_id, {TAG_SEARCH: search.name, TAG_ROLE: ROLE_ENSEMBLE})
    for run in runs:
        if ref in (run.info.run_name, run.info.run_id):
            return run
    known = ", ".join(run.info.run_name for run in runs) or f"none yet: run `dettune ensemble {search.name}`"
    raise NotFound(f"{ref!r} is not an ensemble run of {search.name} (it has: {known}): pass --ensemble one of them")


def export_ensemble(search: SearchHandle, ref: str, out: Path) -> Path:
    """Writes the ensemble run ``ref`` as a directory ``dettune predict`` runs; returns its ``ensemble.json``.

    ``out/members/<exp num>/`` holds each member's ``config.py`` and weights-only ``checkpoint.pth`` (as
    ``dettune export`` writes a trial), ``out/ensemble.json`` the members' folders, TTA and weights, and the
    fusion settings.

    Raises:
        NotFound: ``ref`` is not an ensemble run of the search.
        NothingToExport: A member's checkpoint is no longer in Ray storage; checked before anything is written.
    """
    run = find_ensemble_run(search, ref)
    described = json.loads(mlflow.artifacts.load_text(f"{run.info.artifact_uri}/{ENSEMBLE_FILE}"))
    on_disk = {(c.trial_id, c.epoch): c for c in checkpoint_candidates(experiment_dir(search))}
    gone = [f"{m['exp_num']} epoch {m['epoch']}" for m in described["members"]
            if (m["trial_id"], m["epoch"]) not in on_disk]
    if gone:
        raise NothingToExport(f"the checkpoints of {', '.join(gone)} are no longer in Ray storage (Ray keeps each "
                              f"trial's best two): run `dettune ensemble {search.name}` again and export that")
    for member in described["members"]:
        write_model(on_disk[(member["trial_id"], member["epoch"])], out / MEMBERS_DIR / member["exp_num"])
    spec = {"ensemble": run.info.run_name, "search": search.name, "mlflow_run_id": run.info.run_id,
            "members": [{"dir": f"{MEMBERS_DIR}/{m['exp_num']}", "tta": m["tta"], "weight": m["weight"]}
                        for m in described["members"]],
            "fusion": described["fusion"]}
    path = out / ENSEMBLE_FILE
    path.write_text(json.dumps(spec, indent=2) + "\n", encoding="utf-8")
    return path


def detect_with_ensemble(model_dir: Path, images: Sequence[Path], device: str) -> tuple[list[Detection], float]:
    """An exported ensemble's fused detections on image files (``image_id``: the index, ``category_id``: the
    class index), and the images per second of all its members and the fusion together, models' loading left out."""
    spec = json.loads((model_dir / ENSEMBLE_FILE).read_text(encoding="utf-8"))
    found, seconds = [], 0.0
    for member in spec["members"]:
        detections, took = detect_images(model_dir / member["dir"], images, device, tta=member["tta"])
        found.append(by_image(detections))
        seconds += took
    start = time.perf_counter()
    fused = fuse(found, [m["weight"] for m in spec["members"]], Fusion(**spec["fusion"]), range(len(images)))
    return fused, len(images) / (seconds + time.perf_counter() - start)


def ensemble_member_dirs(model_dir: Path) -> list[Path]:
    """The member folders an exported ensemble names."""
    spec = json.loads((model_dir / ENSEMBLE_FILE).read_text(encoding="utf-8"))
    return [model_dir / member["dir"] for member in spec["members"]]


# --- command line ---------------------------------------------------------------------------------------

def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Adds ``dettune ensemble NAME [--top-k K] [--tta] [--fusion wbf|nms] [--storage S] [--tracking-uri U]``."""
    parser = commands.add_parser("ensemble", help="fuse the boxes of the search's best trials and score the "
                                                  "ensemble on held-out val images")
    parser.add_argument("name", help="the search's name")
    parser.add_argument("--top-k", type=int, default=5, help="how many of the best trials (that still have a "
                                                             "checkpoint) may join (default 5)")
    parser.add_argument("--tta", action="store_true", help="also try each trial with test-time augmentation (its "
                                                           "scale and one step either side, flipped and not)")
    parser.add_argument("--fusion", choices=FUSIONS, default="wbf",
                        help="wbf: Weighted Boxes Fusion (default); nms: class-wise NMS over all members' boxes")
    parser.add_argument("--storage", default=str(DEFAULT_STORAGE),
                        help=f"the search's --storage, whose MLflow store is the default (default: {DEFAULT_STORAGE}); "
                             "with an object store pass --tracking-uri")
    add_tracking_flag(parser)
    parser.add_argument("--out", help="where ensemble.json goes (default: ensembles/NAME)")
    parser.add_argument("--device", help="torch device the members run on (default: cuda when torch sees a GPU, "
                                         "else cpu)")
    parser.set_defaults(handler=run_ensemble)


def run_ensemble(args: argparse.Namespace) -> int:
    """The ``ensemble`` command."""
    uri = tracking_uri_for(args.storage, args.tracking_uri)
    search = open_search(open_tracking(uri), args.name)
    ensemble = build_ensemble(search, top_k=args.top_k, method=args.fusion, tta=args.tta, device=args.device)
    name = log_ensemble(search, ensemble, args.top_k, Path(args.out or Path("ensembles") / args.name))
    for line in summary_lines(ensemble, name):
        print(line)
    return 0


def summary_lines(ensemble: Ensemble, name: str) -> list[str]:
    """The chosen members, and the ensemble against the best single trial on the held-out half."""
    members = ", ".join(f"{v.name} x{w}" if w > 1 else v.name for v, w in ensemble.chosen)
    fusion = ensemble.fusion
    lines = [f"ensemble {name}: {members} ({fusion.method}, iou_thr {fusion.iou_thr}, skip_box_thr "
             f"{fusion.skip_box_thr}), chosen on {len(ensemble.selection)} val images",
             f"held-out half ({len(ensemble.held_out)} images):"]
    columns = {"ensemble": ensemble.scores, "best single": ensemble.single}
    if ensemble.single_tta is not None:
        columns["best single + TTA"] = ensemble.single_tta
    lines.append(f"  {'':<18}" + "".join(f"{title:>19}" for title in columns))
    for column in MAP_COLUMNS:
        lines.append(f"  {column:<18}" + "".join(f"{format_value(column, scores.get(column)):>19}"
                                                 for scores in columns.values()))
    fps = [f"{value:.1f}" for value in (ensemble.fps, ensemble.single_fps, ensemble.single_tta_fps) if value]
    lines.append(f"  {FPS_METRIC:<18}" + "".join(f"{value:>19}" for value in fps))
    return lines
