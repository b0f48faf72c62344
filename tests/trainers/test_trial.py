"""Real MMDetection trials on the CPU: columns, learning, resume, isolation, pretrained loading."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import CASCADE_BASE, FASTER_BASE, tiny_point
from mmengine.hooks import Hook
from mmengine.logging import MessageHub, MMLogger
from mmengine.registry import DefaultScope
from mmengine.visualization import Visualizer

from cocodata.dataset import Dataset
from mmconfigs.backbones import backbone
from spaces.objectives import FPS_METRIC
from trainers.checkpoint import load_checkpoint
from trainers.runner import build_runner, release_globals
from trainers.trial import TRIAL_LOG, TrialSpec, run_trial, trial_config

VAL_COLUMNS = [f"val/bbox_mAP{s}" for s in ("", "_50", "_75", "_s", "_m", "_l")]
COMMON = ["train/loss", "train/loss_rpn_cls", "train/loss_rpn_bbox", "train/lr", "epoch"]
CASCADE = [f"train/s{i}.{k}" for i in range(3) for k in ("loss_cls", "loss_bbox", "acc")]
FASTER = ["train/loss_cls", "train/loss_bbox", "train/acc"]


def _spec(dataset: Dataset, work_dir: Path, base: str = CASCADE_BASE, **point: Any) -> TrialSpec:
    return TrialSpec(base=base, dataset=dataset, point=tiny_point(**point), work_dir=work_dir)


@pytest.mark.parametrize(("base", "head_columns"), [(FASTER_BASE, FASTER), (CASCADE_BASE, CASCADE)],
                         ids=["faster", "cascade"])
def test_two_epochs_report_every_column(synth: Dataset, work_dir: Path, base: str,
                                        head_columns: list[str]) -> None:
    reports: list[tuple[dict[str, float], Path]] = []
    rows = run_trial(_spec(synth, work_dir, base), report=lambda row, ckpt: reports.append((row, ckpt)))

    assert [r["epoch"] for r in rows] == [1.0, 2.0]
    for row, checkpoint in reports:
        assert set(VAL_COLUMNS + COMMON + head_columns) <= set(row)
        assert all(math.isfinite(v) for v in row.values())
        assert checkpoint == work_dir / f"epoch_{int(row['epoch'])}.pth" and checkpoint.is_file()
    assert not any(k.startswith("coco/") for k in rows[0])


def test_scores_are_cocoeval_stats_unrounded(synth: Dataset, tmp_path: Path) -> None:
    """The trial's val columns are pycocotools' COCOeval.stats on the predictions the trial's evaluator saw.

    The base config asks mmdet's evaluator to keep its predictions (``outfile_prefix``, overwritten each epoch),
    and the test evaluates them itself with pycocotools' defaults (at most 100 boxes per image either way).
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    base = tmp_path / "base.py"
    base.write_text(f"_base_ = {FASTER_BASE!r}\nval_evaluator = dict(outfile_prefix={str(tmp_path / 'val')!r})\n")
    rows = run_trial(TrialSpec(base=str(base), dataset=synth, point=tiny_point(), work_dir=tmp_path / "trial"))

    truth = COCO(str(synth.val_json))
    evaluation = COCOeval(truth, truth.loadRes(str(tmp_path / "val.bbox.json")), "bbox")
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    expected = {f"val/bbox_mAP{s}": float(v) for s, v in zip(("", "_50", "_75", "_s", "_m", "_l"),
                                                              evaluation.stats[:6], strict=True) if v != -1}
    reported = {k: v for k, v in rows[-1].items() if k in expected}
    assert reported == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert expected["val/bbox_mAP"] > 0 and any(round(v, 3) != v for v in reported.values()), reported


def test_trial_logs_go_to_its_file_not_the_console(synth: Dataset, work_dir: Path,
                                                   capfd: pytest.CaptureFixture[str]) -> None:
    run_trial(_spec(synth, work_dir, epochs=1))
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    assert "Epoch(train)" in (work_dir / TRIAL_LOG).read_text()


@pytest.mark.slow
def test_map_rises_well_above_first_epoch(synth_large: Dataset, work_dir: Path) -> None:
    rows = run_trial(_spec(synth_large, work_dir, FASTER_BASE, epochs=8, schedule="cosine"))
    maps = [r["val/bbox_mAP"] for r in rows]
    assert maps[-1] >= maps[0] + 0.1, maps


class _StateProbe(Hook):
    """Records weights, momentum buffers and lr at the start of each epoch, and the lr of every iteration."""

    def __init__(self) -> None:
        self.at_epoch_start: dict[int, dict[str, Any]] = {}
        self.lrs: list[float] = []

    def before_train_epoch(self, runner: Any) -> None:
        optimizer = runner.optim_wrapper.optimizer
        self.at_epoch_start[runner.epoch] = {
            "weights": {k: v.detach().clone() for k, v in runner.model.state_dict().items()},
            "momentum": [optimizer.state[p]["momentum_buffer"].clone()
                         for g in optimizer.param_groups for p in g["params"] if p in optimizer.state],
            "lr": runner.optim_wrapper.get_lr()["lr"][0],
        }

    def after_train_iter(self, runner: Any, batch_idx: int, data_batch: Any = None, outputs: Any = None) -> None:
        self.lrs.append(runner.optim_wrapper.get_lr()["lr"][0])


def _train_with_probe(spec: TrialSpec, resume_from: Path | None = None) -> _StateProbe:
    probe = _StateProbe()
    cfg = trial_config(spec, experiment_name=f"probe-{spec.work_dir.name}", resume_from=resume_from)
    try:
        runner = build_runner(cfg)
        runner.register_hook(probe)
        runner.train()
    finally:
        release_globals(cfg.experiment_name)
    return probe


def test_resume_continues_from_checkpoint_state(synth: Dataset, tmp_path: Path) -> None:
    full = _train_with_probe(_spec(synth, tmp_path / "full"))
    checkpoint = tmp_path / "full" / "epoch_1.pth"
    saved = load_checkpoint(checkpoint)
    resumed = _train_with_probe(_spec(synth, tmp_path / "resumed"), resume_from=checkpoint)

    assert list(resumed.at_epoch_start) == [1], "epoch 1 must not run again"
    start = resumed.at_epoch_start[1]
    for key, value in saved["state_dict"].items():  # type: ignore[union-attr]
        assert torch.equal(start["weights"][key], value), key
    saved_momentum = [s["momentum_buffer"] for s in saved["optimizer"]["state"].values()]  # type: ignore[index]
    assert len(start["momentum"]) == len(saved_momentum) > 0
    assert all(torch.equal(a, b) for a, b in zip(start["momentum"], saved_momentum, strict=True))
    assert start["lr"] == full.at_epoch_start[1]["lr"]
    iters_per_epoch = len(full.lrs) // 2
    assert resumed.lrs == full.lrs[iters_per_epoch:]


def _metrics_alone(dataset: Dataset, work_dir: Path) -> list[dict[str, float]]:
    """Runs a trial in a fresh interpreter and returns its rows."""
    code = (
        "import json, sys; from pathlib import Path; from conftest import tiny_point;"
        "from cocodata.dataset import open_dataset; from trainers.trial import TrialSpec, run_trial;"
        f"ds = open_dataset({str(dataset.root)!r}, 'train.json', 'val.json');"
        f"rows = run_trial(TrialSpec(base={CASCADE_BASE!r}, dataset=ds, point=tiny_point(epochs=1, lr=0.01),"
        f" work_dir=Path({str(work_dir)!r})));"
        "sys.__stdout__.write(json.dumps(rows))"
    )
    tests_dir = str(Path(__file__).parents[1])
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=tests_dir)
    return json.loads(done.stdout)


def test_back_to_back_trials_match_each_alone(synth: Dataset, tmp_path: Path) -> None:
    managers = (MessageHub, Visualizer, MMLogger, DefaultScope)
    before = {manager: set(manager._instance_dict) for manager in managers}
    run_trial(_spec(synth, tmp_path / "first", epochs=1, lr=0.03, freeze=1))
    second = run_trial(_spec(synth, tmp_path / "second", epochs=1, lr=0.01))

    def without_timing(rows: list[dict[str, float]]) -> list[dict[str, float]]:
        return [{k: v for k, v in row.items() if k != FPS_METRIC} for row in rows]

    assert without_timing(second) == without_timing(_metrics_alone(synth, tmp_path / "alone"))
    for manager in managers:  # other tests in this process may hold their own instances
        assert set(manager._instance_dict) - before[manager] <= {"mmengine"}, manager


def test_pretrained_backbone_is_loaded_from_local_checkpoint(synth: Dataset, tmp_path: Path) -> None:
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules

    register_all_modules()
    torch.manual_seed(123)
    source = MODELS.build(backbone("r18", tiny=True).cfg)
    weights = tmp_path / "r18.pth"
    torch.save(source.state_dict(), weights)
    spec = TrialSpec(base=FASTER_BASE, dataset=synth, point=tiny_point(epochs=1, freeze=4),
                     work_dir=tmp_path / "trial", pretrained={"r18": str(weights)})
    run_trial(spec)

    trained = load_checkpoint(tmp_path / "trial" / "epoch_1.pth")["state_dict"]
    for key, value in source.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(trained[f"backbone.{key}"], value), key  # type: ignore[index]
