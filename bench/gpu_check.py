"""The GPU check: on a machine with one CUDA GPU, one command shows that GPU trials run and how fast.

1. one 1-GPU trial through `dettune search` (2 epochs, synthetic data at 512 px, R-50 Faster R-CNN), with the GPU
   utilisation that `nvidia-smi` reports, sampled every 0.5 s while the search runs (start-up included);
2. two trials at `gpus_per_trial: 0.5`, packed on the one GPU, and whether they really ran at the same time;
3. training iterations/s with `amp` fp32, fp16 and bf16 (the trial's own config and Runner, 2 epochs each);
4. the trial's `inference/fps` against mmdet's own measurement (`InferenceBenchmark`, what
   `tools/analysis_tools/benchmark.py` runs) of the exported model.

Prints one table. Without a GPU it says so and exits 0. About 5 minutes on one recent GPU.

    .venv/bin/python bench/gpu_check.py [--images 128] [--epochs 2]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from mlflow.tracking import MlflowClient
from mmengine.hooks import Hook

from cocodata.dataset import Dataset, open_dataset
from cocodata.synth import write_dataset
from mmconfigs.build import load_config
from results.export import export_best
from results.store import open_search, open_tracking
from search.driver import SearchOptions, run_search
from spaces.objectives import FPS_METRIC
from trainers.checkpoint import CHECKPOINT_FILE
from trainers.runner import build_runner, release_globals
from trainers.trial import TRIAL_CONFIG, TrialSpec, trial_config

BASE = "mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py"
FIXED = {"backbone": "r50", "preset": "full", "scale": [512, 512], "optimizer": "sgd", "lr": 0.01, "batch_size": 8}
PRECISIONS = ("fp32", "fp16", "bf16")


def no_gpu_reason() -> str | None:
    """Why this machine cannot run the check, or None when it can."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build (see README, GPU machines)"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU"
    return None


class Utilisation:
    """Samples `nvidia-smi`'s GPU utilisation (%) in the background while the ``with`` block runs."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._process: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    def __enter__(self) -> Utilisation:
        try:
            self._process = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "500"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError:  # no nvidia-smi: the row says n/a
            return self
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        for line in self._process.stdout:
            first = line.split(",")[0].strip()  # one line per GPU; the check uses GPU 0
            if first.isdigit():
                self.samples.append(float(first))

    def __exit__(self, *exc: object) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(timeout=10)

    def text(self) -> str:
        if not self.samples:
            return "GPU utilisation n/a (no nvidia-smi)"
        return (f"GPU utilisation mean {statistics.mean(self.samples):.0f} %, max {max(self.samples):.0f} % "
                f"({len(self.samples)} samples)")


def search(dataset: Dataset, out: Path, name: str, *, gpus: float, lrs: list[float], epochs: int) -> Any:
    """Runs a grid search over ``lrs`` with every trial at ``gpus`` GPUs; returns its outcome and wall time."""
    space = {"name": name, "base": BASE,
             "data": {"root": str(dataset.root), "train": dataset.train, "val": dataset.val},
             "budget": {"epochs": epochs, "trials": 1, "gpus_per_trial": gpus, "cpus_per_worker": 2,
                        "max_concurrent": len(lrs)},
             "search": {"algorithm": "grid"}, "scheduler": {"type": "none"},
             "space": {"lr": {"grid": lrs}}, "fixed": {k: v for k, v in FIXED.items() if k != "lr"}}
    space_file = out / f"{name}.yaml"
    space_file.write_text(yaml.safe_dump(space))
    began = time.perf_counter()
    outcome = run_search(SearchOptions(space_file=space_file, storage=out / "runs"))
    return outcome, time.perf_counter() - began


def trial_runs(outcome: Any) -> list[Any]:
    client = MlflowClient(outcome.tracking_uri)
    experiment = client.get_experiment_by_name(outcome.name)
    return list(client.search_runs([experiment.experiment_id], "tags.`dettune.role` = 'trial'"))


def overlap_s(runs: list[Any]) -> float:
    """Seconds during which all the runs were open at once (0 when they ran one after another)."""
    start = max(run.info.start_time for run in runs)
    end = min(run.info.end_time or 0 for run in runs)
    return max(0.0, (end - start) / 1000)


class _IterTimer(Hook):
    """Records each training iteration's duration, skipping the first five of every epoch (cuDNN autotuning,
    allocator and data-loader warm-up)."""

    def __init__(self) -> None:
        self.durations: list[float] = []
        self._last: float | None = None

    def before_train_epoch(self, runner: Any) -> None:
        self._last = None

    def after_train_iter(self, runner: Any, batch_idx: int, data_batch: Any = None, outputs: Any = None) -> None:
        if batch_idx < 4:
            return
        torch.cuda.synchronize()
        now = time.perf_counter()
        if self._last is not None:
            self.durations.append(now - self._last)
        self._last = now


def iterations_per_s(dataset: Dataset, out: Path, precision: str) -> float:
    """Two epochs of the trial's own config and Runner at ``precision``; iterations/s after warm-up."""
    spec = TrialSpec(base=BASE, dataset=dataset, point={**FIXED, "epochs": 2, "amp": precision},
                     work_dir=out / f"amp-{precision}", device="cuda:0")
    cfg = trial_config(spec, experiment_name=f"gpu-check-{precision}")
    cfg.val_cfg = cfg.val_dataloader = cfg.val_evaluator = None  # training speed only
    timer = _IterTimer()
    try:
        torch.cuda.set_device(0)
        runner = build_runner(cfg)
        runner.register_hook(timer)
        runner.train()
    finally:
        release_globals(cfg.experiment_name)
    if not timer.durations:
        raise RuntimeError("an epoch has 5 iterations or fewer: raise --images")
    return 1.0 / statistics.mean(timer.durations)


def mmdet_fps(model_dir: Path) -> float:
    """mmdet's InferenceBenchmark on the exported model: batch 1, 5 warm-up images, CUDA-synchronised."""
    from mmdet.registry import DATASETS
    from mmdet.utils.benchmark import InferenceBenchmark
    from mmengine.registry import init_default_scope

    cfg = load_config(model_dir / TRIAL_CONFIG)
    init_default_scope(cfg.get("default_scope", "mmdet"))  # as tools/analysis_tools/benchmark.py does
    images = len(DATASETS.build(cfg.test_dataloader.dataset))
    benchmark = InferenceBenchmark(cfg, str(model_dir / CHECKPOINT_FILE), distributed=False, is_fuse_conv_bn=False,
                                   max_iter=images, log_interval=images, num_warmup=5)
    return float(benchmark.run(repeat_num=1)["avg_fps"])


def table(rows: list[tuple[str, str, str]]) -> str:
    header = ("check", "result", "detail")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(3)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in [header, *rows]]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=128, help="synthetic images (3/4 train, 1/4 val)")
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args(argv)
    reason = no_gpu_reason()
    if reason is not None:
        print(f"gpu_check: no GPU to check: {reason}. Nothing was run.")
        return 0
    rows: list[tuple[str, str, str]] = []
    with tempfile.TemporaryDirectory(prefix="dettune-gpu-check-") as tmp:
        out = Path(tmp)
        write_dataset(out / "data", images=args.images, size=512, seed=0)
        dataset = open_dataset(out / "data", "train.json", "val.json")

        with Utilisation() as utilisation:
            one, wall = search(dataset, out, "one-gpu", gpus=1, lrs=[0.01], epochs=args.epochs)
        (run,) = trial_runs(one)
        rows.append(("1-GPU trial", f"{run.data.tags.get('dettune.status')} in {wall:.0f} s",
                     f"{args.epochs} epochs at 512 px; {utilisation.text()}"))

        packed, wall = search(dataset, out, "half-gpu", gpus=0.5, lrs=[0.01, 0.02], epochs=args.epochs)
        runs = trial_runs(packed)
        statuses = ", ".join(sorted(r.data.tags.get("dettune.status", "?") for r in runs))
        rows.append(("2 trials at 0.5 GPU", f"{statuses} in {wall:.0f} s",
                     f"both running at once for {overlap_s(runs):.0f} s"))

        for precision in PRECISIONS:
            speed = iterations_per_s(dataset, out, precision)
            rows.append((f"training {precision}", f"{speed:.2f} it/s", f"batch {FIXED['batch_size']}, 512 px"))

        model_dir = out / "model"
        export_best(open_search(open_tracking(one.tracking_uri), one.name), model_dir)
        trial_fps = run.data.metrics.get(FPS_METRIC, float("nan"))
        rows.append(("inference FPS", f"{trial_fps:.1f} (trial)", f"{mmdet_fps(model_dir):.1f} (mmdet benchmark)"))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
