"""How many trials within a limit a constrained search finds, against the same search without the limit.

Runs two searches with the same budget, seed and objectives (val/bbox_mAP_50 against inference/fps) over the
input scale, backbone and lr of a tiny Faster R-CNN on synthetic data: (a) with ``constraints: {model/gflops:
{max: LIMIT}}``, which Optuna's TPE gets as constraints, and (b) without, its trials filtered by the same limit
afterwards. Prints, for each, how many trials met the limit. GFLOPs, not FPS, is the limit so that the machine's
load cannot change which trials are feasible. TPE samples at random for its first 10 trials (Optuna's
``n_startup_trials``), so the budget must exceed 10 for the limit to steer anything.

    .venv/bin/python bench/constrained.py [--trials 16] [--max-gflops 0.1]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from mlflow.tracking import MlflowClient

from search.driver import SearchOptions, run_search
from search.tracking import TAG_ROLE
from spaces.objectives import GFLOPS_METRIC
from spaces.synth import write_dataset

BASE = "mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py"
SCALES = [[s, s] for s in (64, 96, 128, 160, 192, 224, 256, 320)]


def space(name: str, root: Path, trials: int, constraints: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "base": BASE, "data": {"root": str(root), "train": "train.json", "val": "val.json"},
            "metric": "val/bbox_mAP_50", "objectives": [{"metric": "inference/fps", "mode": "max"}],
            "constraints": constraints, "budget": {"epochs": 1, "trials": trials, "max_concurrent": 2},
            "search": {"algorithm": "tpe", "seed": 0}, "scheduler": {"type": "none"},
            "space": {"scale": {"choice": SCALES}, "backbone": {"choice": ["r18", "r50"]},
                      "lr": {"loguniform": [0.005, 0.03]}},
            "fixed": {"preset": "tiny", "optimizer": "sgd", "batch_size": 4}}


def gflops_of_trials(tracking_uri: str, name: str) -> list[float]:
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(name)
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`{TAG_ROLE}` = 'trial'")
    return [run.data.metrics[GFLOPS_METRIC] for run in runs if GFLOPS_METRIC in run.data.metrics]


def run(name: str, data: dict[str, Any], out: Path) -> tuple[list[float], float]:
    space_file = out / f"{name}.yaml"
    space_file.write_text(yaml.safe_dump(data, sort_keys=False))
    began = time.time()
    outcome = run_search(SearchOptions(space_file=space_file, storage=out / "runs"))
    return gflops_of_trials(outcome.tracking_uri, name), time.time() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--max-gflops", type=float, default=0.1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dettune-constrained-") as tmp:
        out = Path(tmp)
        write_dataset(out / "data", images=16, size=160, seed=0)
        limit = {GFLOPS_METRIC: {"max": args.max_gflops}}
        runs = {"constrained": run("constrained", space("constrained", out / "data", args.trials, limit), out),
                "unconstrained": run("unconstrained", space("unconstrained", out / "data", args.trials, {}), out)}
    print(f"{args.trials} trials of 1 epoch each, limit {GFLOPS_METRIC} <= {args.max_gflops:g}, "
          f"load average {os.getloadavg()[0]:.1f} at the end")
    for name, (gflops, seconds) in runs.items():
        feasible = sum(g <= args.max_gflops for g in gflops)
        print(f"{name:>13}: {feasible} of {len(gflops)} trials within the limit, {seconds:.0f} s")


if __name__ == "__main__":
    main()
