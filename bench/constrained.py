"""How many trials within a limit a constrained search proposes, against the same search without the limit.

The searcher is dettune's own (:class:`search.optuna_search.ObjectiveSearch`, multi-objective TPE), driven as
Ray Tune drives it, over backbone (r18, r50), input scale (64 to 320 px) and lr of the tiny Faster R-CNN, towards
val/bbox_mAP_50 (max) and model/gflops (min). Each proposal's GFLOPs is real: measured once per backbone and scale
with :func:`trainers.cost.model_cost` on a synthetic val image. Its mAP is not trained (two full searches take an
hour on a loaded 2-core machine): a stand-in that, like the log's experiment 2, rises with scale and backbone size,
peaks at lr 0.01 and carries seeded noise. Run (a) with ``constraints: {model/gflops: {max: LIMIT}}`` and (b)
without, filtered by the same limit afterwards, over several seeds at one budget; prints how many trials met it.
TPE samples at random for its first 10 trials (Optuna's ``n_startup_trials``), so budgets of 10 or fewer tie.

    .venv/bin/python bench/constrained.py [--trials 24] [--seeds 5] [--max-gflops 0.1]
"""

from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from mmdet.registry import DATASETS, MODELS
from mmengine.registry import init_default_scope

from cocodata.dataset import Dataset, open_dataset
from cocodata.synth import write_dataset
from mmconfigs.build import build_config
from search.optuna_search import ObjectiveSearch
from spaces.objectives import GFLOPS_METRIC
from spaces.schema import Space
from trainers.cost import model_cost

BASE = "mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py"
PRIMARY = "val/bbox_mAP_50"
SCALES = [[s, s] for s in (64, 96, 128, 160, 192, 224, 256, 320)]
BACKBONES = ["r18", "r50"]


def space(root: Path, trials: int, seed: int, constraints: dict[str, Any]) -> Space:
    return Space.from_json({
        "name": "constrained", "base": BASE, "data": {"root": str(root), "train": "train.json", "val": "val.json"},
        "metric": PRIMARY, "objectives": [{"metric": GFLOPS_METRIC, "mode": "min"}], "constraints": constraints,
        "budget": {"epochs": 1, "trials": trials}, "search": {"algorithm": "tpe", "seed": seed},
        "scheduler": {"type": "none"},
        "space": {"scale": {"choice": SCALES}, "backbone": {"choice": BACKBONES},
                  "lr": {"loguniform": [0.001, 0.1]}},
        "fixed": {"preset": "tiny", "optimizer": "sgd", "batch_size": 4}})


def measured_gflops(dataset: Dataset) -> dict[tuple[str, int], float]:
    """model/gflops of every backbone and scale, on the first val image as the trial's pipeline loads it."""
    init_default_scope("mmdet")
    out = {}
    for backbone in BACKBONES:
        for scale in SCALES:
            point = {"backbone": backbone, "scale": scale, "preset": "tiny", "optimizer": "sgd", "lr": 0.01,
                     "schedule": "step", "epochs": 1, "batch_size": 4}
            cfg = build_config(BASE, point, dataset)
            model = MODELS.build(cfg.model)
            out[(backbone, scale[0])] = model_cost(model, DATASETS.build(cfg.val_dataloader.dataset))[GFLOPS_METRIC]
    return out


def stand_in_map(backbone: str, scale: int, lr: float, rng: random.Random) -> float:
    """Rises with scale and backbone size, peaks at lr 0.01, plus noise: the shape, not the numbers, of a real run."""
    value = 0.1 + 0.05 * math.log2(scale / 64) + (0.04 if backbone == "r50" else 0.0)
    return max(0.0, value - 0.03 * abs(math.log10(lr / 0.01)) + rng.gauss(0.0, 0.01))


def feasible_count(space: Space, gflops: dict[tuple[str, int], float], limit: float) -> int:
    """Runs one search as Tune would (suggest, result, complete) and counts the trials within the limit."""
    searcher = ObjectiveSearch(space)
    rng = random.Random(space.search.seed)
    within = 0
    for index in range(space.budget.trials):
        trial_id = f"t{index}"
        point = space.decode_optuna(searcher.suggest(trial_id))
        cost = gflops[(point["backbone"], point["scale"][0])]
        row = {"epoch": 1, "training_iteration": 1, GFLOPS_METRIC: cost,
               PRIMARY: stand_in_map(point["backbone"], point["scale"][0], point["lr"], rng)}
        searcher.on_trial_result(trial_id, row)
        searcher.on_trial_complete(trial_id, result=row)
        within += cost <= limit
    return within


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--max-gflops", type=float, default=0.1)
    args = parser.parse_args()
    began = time.time()
    with tempfile.TemporaryDirectory(prefix="dettune-constrained-") as tmp:
        write_dataset(Path(tmp), images=4, size=160, seed=0)
        dataset = open_dataset(tmp, "train.json", "val.json")
        gflops = measured_gflops(dataset)
        counts: dict[str, list[int]] = {"constrained": [], "unconstrained, filtered": []}
        for seed in range(args.seeds):
            limit = {GFLOPS_METRIC: {"max": args.max_gflops}}
            counts["constrained"].append(feasible_count(space(dataset.root, args.trials, seed, limit), gflops,
                                                        args.max_gflops))
            counts["unconstrained, filtered"].append(feasible_count(space(dataset.root, args.trials, seed, {}),
                                                                    gflops, args.max_gflops))
    share = sum(g <= args.max_gflops for g in gflops.values())
    print("GFLOPs per (backbone, scale): " + ", ".join(f"{b}@{s} {g:.3f}" for (b, s), g in sorted(gflops.items())))
    print(f"{share} of {len(gflops)} backbone-scale pairs within {GFLOPS_METRIC} <= {args.max_gflops:g}; "
          f"{args.trials} trials per search, seeds 0..{args.seeds - 1}")
    for name, found in counts.items():
        print(f"{name:>24}: {statistics.fmean(found):.1f} trials within the limit on average ({found})")
    print(f"{time.time() - began:.0f} s, load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
