"""Does a warm start help? The best val/bbox_mAP after a few trials, warm-started against cold, on synthetic data.

One earlier TPE search over the learning rate trains ``--earlier`` trials. Then, for each seed, the same space is
searched twice with ``--trials`` trials: cold, and with ``warm_start`` on the earlier search (its trials told to
TPE before the first proposal). Same seed, same data, same budget; prints the best val/bbox_mAP of each and the
mean difference.

Optuna's TPE samples at random until it has seen ``n_startup_trials`` (10) trials, warm-start trials included:
with 10 earlier trials the warm search proposes from TPE's model at once, the cold one samples at random.

    .venv/bin/python bench/warm_start.py [--seeds 3] [--trials 4] [--earlier 10] [--epochs 2] [--images 48]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from mlflow.tracking import MlflowClient

from cocodata.synth import write_dataset
from search.driver import SearchOptions, run_search

BASE = "mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py"
FIXED = {"backbone": "r18", "preset": "tiny", "scale": [160, 160], "optimizer": "sgd", "batch_size": 4}
METRIC = "val/bbox_mAP"


def _space(root: Path, name: str, *, trials: int, epochs: int, seed: int, warm: list[str]) -> dict[str, Any]:
    return {"name": name, "base": BASE, "data": {"root": str(root), "train": "train.json", "val": "val.json"},
            "metric": METRIC, "budget": {"epochs": epochs, "trials": trials, "max_concurrent": 2},
            "search": {"algorithm": "tpe", "seed": seed}, "scheduler": {"type": "none"},
            "space": {"lr": {"loguniform": [1.0e-3, 0.1]}}, "fixed": FIXED, "warm_start": warm}


def _best(out: Path, doc: dict[str, Any]) -> float:
    """Runs the search; returns its best val/bbox_mAP at any epoch of any trial."""
    space_file = out / f"{doc['name']}.yaml"
    space_file.write_text(yaml.safe_dump(doc))
    outcome = run_search(SearchOptions(space_file=space_file, storage=out / "runs"))
    client = MlflowClient(outcome.tracking_uri)
    experiment = client.get_experiment_by_name(outcome.name)
    runs = client.search_runs([experiment.experiment_id], "tags.`dettune.role` = 'trial'")
    return max(m.value for run in runs for m in client.get_metric_history(run.info.run_id, METRIC))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--earlier", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--images", type=int, default=48)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="warm-start-") as tmp:
        out = Path(tmp)
        write_dataset(out / "data", images=args.images, size=160, seed=0)
        began = time.time()
        earlier = _best(out, _space(out / "data", "earlier", trials=args.earlier, epochs=args.epochs, seed=100,
                                    warm=[]))
        print(f"earlier search: {args.earlier} trials, best {METRIC} {earlier:.4f}")
        gains = []
        for seed in range(args.seeds):
            cold = _best(out, _space(out / "data", f"cold-{seed}", trials=args.trials, epochs=args.epochs,
                                     seed=seed, warm=[]))
            warm = _best(out, _space(out / "data", f"warm-{seed}", trials=args.trials, epochs=args.epochs,
                                     seed=seed, warm=["earlier"]))
            gains.append(warm - cold)
            print(f"seed {seed}: best {METRIC} after {args.trials} trials: cold {cold:.4f}, warm {warm:.4f}")
        print(f"warm - cold: mean {statistics.mean(gains):+.4f} over {args.seeds} seeds "
              f"({time.time() - began:.0f} s in all)")


if __name__ == "__main__":
    main()
