"""Does an ensemble beat the best single trial? The demo search, then ``dettune ensemble`` without and with TTA.

Runs ``spaces/demo.yaml`` on its synthetic data (96 images, written on first use; 8 trials, ASHA) in a temporary
storage, then ``dettune ensemble demo --top-k K`` and the same with ``--tta`` (the second call reuses the plain
predictions the first cached). Prints, on the held-out half of val: the best single trial, the best single trial
with TTA, the ensemble and the ensemble with TTA (mAP in percent, FPS), and the machine's load.

    .venv/bin/python bench/ensemble.py [--top-k 5] [--storage DIR]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from cocodata.synth import write_dataset
from results.report import format_value
from search.cli import DEMO_DATA, DEMO_IMAGES, DEMO_SPACE
from search.cli import main as dettune
from tracking_names import local_tracking_uri

COLUMNS = ("val/bbox_mAP", "val/bbox_mAP_50", "val/bbox_mAP_s", "inference/fps")


def _latest_ensemble(storage: Path) -> dict[str, float]:
    client = MlflowClient(local_tracking_uri(storage))
    experiment = client.get_experiment_by_name("demo")
    assert experiment is not None, "the demo search did not run"
    (run,) = client.search_runs([experiment.experiment_id], "tags.`dettune.role` = 'ensemble'",
                                order_by=["attributes.start_time DESC"], max_results=1)
    print(f"  {run.info.run_name}: members {run.data.params['members']} weights {run.data.params['weights']}")
    return dict(run.data.metrics)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--storage", help="search here (default: a temporary folder)")
    args = parser.parse_args()
    if not (DEMO_DATA / "train.json").is_file():
        write_dataset(DEMO_DATA, images=DEMO_IMAGES, size=160, seed=0)
    with tempfile.TemporaryDirectory(prefix="ensemble-bench-") as tmp:
        storage = Path(args.storage or tmp).resolve()
        start = time.perf_counter()
        dettune(["search", str(DEMO_SPACE), "--storage", str(storage), "--overwrite"])
        print(f"search: {time.perf_counter() - start:.0f} s, load {os.getloadavg()[0]:.1f}")
        rows = {}
        for flags, label in (([], "ensemble"), (["--tta"], "ensemble + TTA")):
            start = time.perf_counter()
            dettune(["ensemble", "demo", "--storage", str(storage), "--top-k", str(args.top_k), "--out",
                     str(storage / "ensemble-out"), *flags])
            print(f"{label}: {time.perf_counter() - start:.0f} s, load {os.getloadavg()[0]:.1f}")
            metrics = _latest_ensemble(storage)
            rows[label] = metrics
            rows["best single"] = {k.removeprefix("single/"): v for k, v in metrics.items() if k.startswith("single/")}
            if "--tta" in flags:
                rows["best single + TTA"] = {k.removeprefix("single_tta/"): v for k, v in metrics.items()
                                             if k.startswith("single_tta/")}
        print(f"\nheld-out half of val, load {os.getloadavg()[0]:.1f}")
        print(f"{'':<20}" + "".join(f"{c:>18}" for c in COLUMNS))
        for label in ("best single", "best single + TTA", "ensemble", "ensemble + TTA"):
            print(f"{label:<20}" + "".join(f"{format_value(c, rows[label].get(c)):>18}" for c in COLUMNS))


if __name__ == "__main__":
    main()
