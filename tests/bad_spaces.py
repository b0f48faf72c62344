"""The broken space files the suite knows: the schema tests check each problem's field and rule, and the CLI
sweep (``tests/search/test_bad_input.py``) feeds every one of them to ``dettune search``."""

from __future__ import annotations

from typing import Any

import yaml

from spaces.errors import MISSING

VALID = """\
name: backbone-vs-map
base: mmdet::cascade_rcnn/cascade-rcnn_r50_fpn_1x_coco.py
data: {root: data/trash, train: train.json, val: val.json}
metric: val/bbox_mAP
hypothesis: a bigger backbone raises mAP at the same budget
budget: {epochs: 12, trials: 16, gpus_per_trial: 1, cpus_per_worker: 2, max_concurrent: 4, max_retries: 2}
search: {algorithm: tpe, seed: 0}
scheduler: {type: asha, grace_epochs: 1, reduction_factor: 3}
space:
  backbone: {choice: [r50, r101, swin-t]}
  lr: {loguniform: [1.0e-4, 2.0e-2]}
  scale: {choice: [[800, 800], [512, 512]]}
fixed: {preset: tiny, schedule: step}
overrides: {model.rpn_head.anchor_generator.scales: [8]}
pretrained: {r50: /path/to/r50.pth}
"""


def valid() -> dict[str, Any]:
    return yaml.safe_load(VALID)


def edited(path: str, value: Any) -> dict[str, Any]:
    """The valid file with the field at dotted ``path`` set to ``value`` (deleted for MISSING)."""
    data = valid()
    *parents, last = path.split(".", 1)
    node = data
    for part in parents:
        node = node.setdefault(part, {})
    if value is MISSING:
        del node[last]
    else:
        node[last] = value
    return data


# Each row: a field set to a bad value (MISSING deletes it), the field path reported and a rule fragment.
# The problem's value is the bad value, except for a bad choice value (the value itself: test_schema's SHOWN).
BAD_FIELDS = [
    ("name", "my search", "name", "must match ^[A-Za-z0-9][A-Za-z0-9_.-]*$"),
    ("name", "-x", "name", "starting with a letter or digit"),
    ("name", MISSING, "name", "required field is missing"),
    ("base", "", "base", "e.g. mmdet::"),
    ("data.val", MISSING, "data.val", "required field is missing"),
    ("data.vall", "val.json", "data.vall", "unknown field; did you mean 'val'?"),
    ("budjet", {}, "budjet", "unknown field; did you mean 'budget'?"),
    ("budget.epochs", 0, "budget.epochs", "must be >= 1"),
    ("budget.epochs", "12", "budget.epochs", "valid integer"),
    ("budget.trials", 0, "budget.trials", "must be >= 1"),
    ("budget.gpus_per_trial", -1, "budget.gpus_per_trial", "must be >= 0: use 0 to train on CPU workers"),
    ("budget.workers_per_trial", 0, "budget.workers_per_trial", "must be >= 1"),
    ("budget.workers_per_trial", 2, "budget.workers_per_trial", "2 workers cannot share gpus_per_trial 1 evenly"),
    ("budget.gpus_per_trial", 1.5, "budget.gpus_per_trial", "above one GPU a trial takes whole GPUs"),
    ("budget.cpus_per_worker", 0, "budget.cpus_per_worker", "must be >= 1"),
    ("budget.max_concurrent", 0, "budget.max_concurrent", "must be >= 1"),
    ("budget.max_retries", -1, "budget.max_retries", "must be >= 0"),
    ("budget.hours", 0, "budget.hours", "must be > 0: give the hours the search may run as a positive number"),
    ("budget.hours", "two", "budget.hours", "valid number: give the hours the search may run"),
    ("budget.hours", True, "budget.hours", "valid number"),
    ("scheduler.reduction_factor", 1, "scheduler.reduction_factor", "must be >= 2"),
    ("scheduler.grace_epochs", 0, "scheduler.grace_epochs", "must be >= 1"),
    ("scheduler.grace_epochs", 12, "scheduler.grace_epochs", "grace_epochs < budget.epochs must hold"),
    ("scheduler.type", "hyperband", "scheduler.type", "'asha' or 'none'"),
    ("search.algorithm", "bayes", "search.algorithm", "'tpe', 'nsga2', 'random' or 'grid'"),
    ("metric", "val/bbox_map", "metric", "did you mean 'val/bbox_mAP'?"),
    ("mode", "maximize", "mode", "'max' or 'min'"),
    ("space.backbon", {"choice": ["r50"]}, "space.backbon", "did you mean 'backbone'?"),
    ("fixed.presett", "tiny", "fixed.presett", "did you mean 'preset'?"),
    ("space.epochs", {"randint": [1, 12]}, "space.epochs", "epochs comes from budget.epochs"),
    ("fixed.epochs", 3, "fixed.epochs", "epochs comes from budget.epochs"),
    ("fixed.lr", 0.01, "fixed.lr", "lr is both searched (space.lr) and fixed"),
    ("fixed.batch_size", 0, "fixed.batch_size", "must be > 0"),
    ("fixed.freeze", 7, "fixed.freeze", "must be one of [-1, 0, 1, 2, 3, 4]"),
    ("space.backbone", {"choice": ["r50", "r999"]}, "space.backbone", "every choice value must be one of"),
    ("space.scale", {"choice": [[800, 800], [800, 8000]]}, "space.scale", "between 32 and 4096 pixels"),
    ("space.lr", {"uniform": [0.0, 0.1]}, "space.lr", "uniform low 0 breaks the lr rule: must be > 0"),
    ("space.lr", {"quniform": [0.0, 0.1, 0.01]}, "space.lr", "must be > 0"),
    ("space.lr", {"loguniform": [0.1, 0.01]}, "space.lr", "but got (low=0.1, high=0.01)"),
    ("space.batch_size", {"uniform": [1.0, 8.0]}, "space.batch_size", "must be a whole number; use randint"),
    ("space.batch_size", {"randint": [0, 8]}, "space.batch_size", "randint low 0 breaks the batch_size rule"),
    ("space.optimizer", {"uniform": [0.0, 1.0]}, "space.optimizer", "optimizer is categorical"),
    ("space.roi_head", {"grid": ["faster", "cascade"]}, "space.roi_head", "grid only works with search"),
    ("space.lr", 0.01, "space.lr", "put it under fixed"),
    ("pretrained.r5", "/x.pth", "pretrained.r5", "keys are backbone names"),
]

BAD_OBJECTIVES = [
    ({"objectives": [{"metric": "inference/fsp", "mode": "max"}]}, "objectives.0.metric", "inference/fsp",
     "did you mean 'inference/fps'?"),
    ({"objectives": [{"metric": "inference/fps", "mode": "maximize"}]}, "objectives.0.mode", "maximize",
     "'max' or 'min'"),
    ({"objectives": [{"metric": "inference/fps"}]}, "objectives.0.mode", MISSING, "required field is missing"),
    ({"objectives": [{"metric": "val/bbox_mAP", "mode": "max"}]}, "objectives.0.metric", "val/bbox_mAP",
     "is already an objective"),
    ({"constraints": {"lb/public_mAP": {"min": 50}}}, "constraints.lb/public_mAP", {"min": 50},
     "no trial reports lb/public_mAP (`dettune lb` records it after the search)"),
    ({"constraints": {"model/gflop": {"max": 5}}}, "constraints.model/gflop", {"max": 5},
     "did you mean 'model/gflops'?"),
    ({"constraints": {"inference/fps": {}}}, "constraints.inference/fps", {}, "a limit needs min or max"),
    ({"constraints": {"model/gflops": {"min": 5, "max": 1}}}, "constraints.model/gflops", {"min": 5, "max": 1},
     "min <= max must hold, but got (min=5, max=1)"),
    ({"objectives": [{"metric": "inference/fps", "mode": "max"}], "warm_start": ["earlier"]}, "warm_start",
     ["earlier"], "objectives need every objective's value: remove warm_start or objectives"),
    ({"objectives": [{"metric": "inference/fps", "mode": "max"}], "search": {"algorithm": "grid"},
      "space": {"scale": {"choice": [[800, 800], [512, 512]]}}}, "search.algorithm", "grid",
     "nothing to steer: use tpe or nsga2, or remove objectives"),
]
