"""Data-parallel trials: Ray Train's TorchTrainer with 2 CPU workers on gloo, mmengine with launcher='pytorch'."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import ray.cloudpickle
import ray.train
import torch
from conftest import FASTER_BASE, write_space
from mlflow.tracking import MlflowClient
from mmengine.hooks import Hook
from ray.train.torch import TorchTrainer

from cocodata.dataset import Dataset, open_dataset
from search.driver import SearchOptions, make_plan, run_search
from search.trainable import _worker_loop, fit_to_end_or_failure
from spaces.schema import load_space
from trainers.runner import build_runner, release_globals
from trainers.trial import TrialSpec, trial_config


class _StepProbe(Hook):
    """Saves the parameters after the first step, and which images this rank trained on.

    Parameters only: BN running statistics are per-rank buffers under DDP (broadcast_buffers=False).
    """

    def __init__(self, out: Path) -> None:
        self.out = out
        self.image_ids: list[int] = []

    def before_train_iter(self, runner: Any, batch_idx: int, data_batch: Any = None) -> None:
        self.image_ids += [s.img_id for s in data_batch["data_samples"]]

    def after_train_iter(self, runner: Any, batch_idx: int, data_batch: Any = None, outputs: Any = None) -> None:
        if batch_idx == 0:
            weights = {k: v.detach().clone() for k, v in runner.model.module.named_parameters()}
            torch.save({"weights": weights, "wrapper": type(runner.model).__name__}, self.out / "step1.pt")

    def after_train_epoch(self, runner: Any) -> None:
        torch.save(self.image_ids, self.out / "image_ids.pt")
        iterations = {"epoch": len(runner.train_dataloader), "warmup": runner.cfg.param_scheduler[0]["end"]}
        torch.save(iterations, self.out / "iterations.pt")


def _probe_loop(config: dict[str, Any]) -> None:
    rank = ray.train.get_context().get_world_rank()
    out = Path(config["out"]) / f"rank{rank}"
    dataset = open_dataset(config["root"], "train.json", "val.json")
    point = dict(backbone="r18", preset="tiny", scale=[160, 160], optimizer="sgd", lr=0.02, epochs=1, batch_size=2)
    spec = TrialSpec(base=FASTER_BASE, dataset=dataset, point=point, work_dir=out, workers=2)
    cfg = trial_config(spec, experiment_name=f"ddp-probe-{rank}")
    try:
        runner = build_runner(cfg)
        runner.register_hook(_StepProbe(out))
        runner.train()
    finally:
        release_globals(cfg.experiment_name)


def test_two_workers_train_in_sync(tmp_path: Path, synth: Dataset, ray_local: None) -> None:
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    trainer = TorchTrainer(
        _probe_loop, train_loop_config={"out": str(tmp_path), "root": str(synth.root)},
        scaling_config=ray.train.ScalingConfig(num_workers=2, use_gpu=False),
        run_config=ray.train.RunConfig(name="ddp-probe", storage_path=str(tmp_path / "storage")))
    trainer.fit()

    steps = [torch.load(tmp_path / f"rank{r}" / "step1.pt") for r in (0, 1)]
    assert all(s["wrapper"] == "MMDistributedDataParallel" for s in steps)
    for key, value in steps[0]["weights"].items():
        assert torch.equal(value, steps[1]["weights"][key]), f"{key} differs between ranks after a step"
    seen = [set(torch.load(tmp_path / f"rank{r}" / "image_ids.pt")) for r in (0, 1)]
    assert seen[0] and seen[1] and not seen[0] & seen[1], "each rank must train on its own shard"
    assert len(seen[0] | seen[1]) == synth.num_train_images
    for rank in (0, 1):  # the warm-up (shorter than an epoch here) is counted in this worker's iterations
        iterations = torch.load(tmp_path / f"rank{rank}" / "iterations.pt")
        assert iterations["warmup"] == iterations["epoch"] == len(seen[rank]) // 2


def _train_rank1_breaks(loop_config: dict[str, Any]) -> None:
    """The trial's own worker loop, with rank 1's detector breaking at its second training iteration."""
    from mmdet.models.detectors.two_stage import TwoStageDetector

    if ray.train.get_context().get_world_rank() == 1:
        loss, calls = TwoStageDetector.loss, []

        def broken(self: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
            calls.append(1)
            if len(calls) == 2 and loop_config["fault"] == "oom":
                raise torch.OutOfMemoryError("CUDA out of memory (injected on rank 1)")
            losses = loss(self, *args, **kwargs)
            if len(calls) >= 2:
                losses["loss_cls"] = losses["loss_cls"] * float("nan")
            return losses

        TwoStageDetector.loss = broken  # type: ignore[method-assign]
    _worker_loop(loop_config)


@pytest.mark.timeout(300)  # a rank left waiting in a collective would hang for the 30-minute process-group timeout
@pytest.mark.parametrize(("fault", "reason"), [
    ("nan", "TrialDiverged: loss became nan on rank 1 in epoch 1, iteration 2"),
    ("oom", "OutOfMemoryError: CUDA out of memory (injected on rank 1)"),
])
def test_a_fault_on_one_rank_ends_the_trial_on_every_rank(tmp_path: Path, synth: Dataset, ray_local: None,
                                                          fault: str, reason: str) -> None:
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    space_file = write_space(tmp_path / "space.yaml", synth, name="fault",
                             budget={"epochs": 2, "trials": 1, "workers_per_trial": 2, "cpus_per_worker": 1})
    plan = make_plan(load_space(space_file), tmp_path / "runs")
    trainer = TorchTrainer(
        _train_rank1_breaks,
        train_loop_config={"config": {"lr": 0.01}, "plan": plan, "trial_id": "t0", "fault": fault},
        scaling_config=ray.train.ScalingConfig(num_workers=2, use_gpu=False),
        run_config=ray.train.RunConfig(name=f"fault-{fault}", storage_path=plan.storage))

    fit_to_end_or_failure(trainer, plan, "t0")  # returns: the trial failed for good, Tune must not retry it

    assert (plan.failure_of("t0") or "").startswith(reason)


def test_two_worker_search_reports_each_epoch_once(tmp_path: Path, synth: Dataset, ray_local: None) -> None:
    space_file = write_space(tmp_path / "space.yaml", synth, name="ddp",
                             budget={"epochs": 2, "trials": 1, "workers_per_trial": 2, "cpus_per_worker": 1})
    outcome = run_search(SearchOptions(space_file=space_file, storage=tmp_path / "runs"))

    client = MlflowClient(outcome.tracking_uri)
    experiment = client.get_experiment_by_name("ddp")
    children = client.search_runs([experiment.experiment_id], "tags.`dettune.role` = 'trial'")
    assert len(children) == 1
    run_id = children[0].info.run_id
    for key in ("val/bbox_mAP", "train/loss", "train/lr"):
        assert [m.step for m in client.get_metric_history(run_id, key)] == [1, 2], key
    logs = sorted((outcome.experiment_dir / "trials").glob("*/rank*/trial.log"))
    assert [p.parent.name for p in logs] == ["rank0", "rank1"]
    assert "Epoch(train) [2]" in logs[0].read_text()  # mmengine logs only errors on other ranks
