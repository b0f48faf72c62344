"""``dettune export``: the best checkpoint as an mmdet model directory, loadable and reproducing its score."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from mlflow.tracking import MlflowClient
from test_report import FinishedSearch, finished_search, raw_best, trial_runs

from cocodata.dataset import Dataset
from cocodata.synth import CLASSES
from results.export import (
    EXPORTED_FILES,
    Candidate,
    NothingToExport,
    checkpoint_candidates,
    export_best,
    metric_mode,
    ranked_candidates,
    trial_params,
)
from results.store import open_search, open_tracking
from spaces.errors import BadArgument
from spaces.schema import Objective, load_space
from tracking_names.storage import Storage

VAL = ["val/bbox_mAP", "val/bbox_mAP_50", "val/bbox_mAP_75", "val/bbox_mAP_s", "val/bbox_mAP_m", "val/bbox_mAP_l"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, synth_large: Dataset, ray_local: None) -> FinishedSearch:
    return finished_search(tmp_path_factory, synth_large)


@pytest.fixture(scope="module")
def exported(finished: FinishedSearch, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export") / "model"
    export_best(open_search(open_tracking(finished.tracking_uri), finished.name), out)
    return out


@pytest.mark.slow
def test_export_writes_the_best_trials_files(finished: FinishedSearch, exported: Path) -> None:
    runs = trial_runs(finished.tracking_uri)
    best = {num: raw_best(finished.tracking_uri, run.info.run_id) for num, run in runs.items()}
    top = max(b[1] for b in best.values() if b is not None)
    info = json.loads((exported / "metrics.json").read_text())
    params = json.loads((exported / "params.json").read_text())
    winner = info["exp_num"]

    assert sorted(p.name for p in exported.iterdir()) == sorted(EXPORTED_FILES)
    assert best[winner] == (info["epoch"], top), "not the best epoch of the best trial"
    assert info["mlflow_run_id"] == runs[winner].info.run_id and info["metrics"]["val/bbox_mAP"] == top
    assert info["selected_by"] == {"metric": "val/bbox_mAP", "mode": "max"}
    assert params["lr"] == float(runs[winner].data.params["lr"]) and params["scale"] == [160, 160]
    assert "inference/fps" in info["metrics"]


@pytest.mark.slow
def test_checkpoint_loads_weights_only_with_the_class_names(exported: Path) -> None:
    checkpoint = torch.load(exported / "checkpoint.pth", weights_only=True)

    assert set(checkpoint) == {"state_dict", "meta"}
    assert list(checkpoint["meta"]["dataset_meta"]["classes"]) == list(CLASSES)


@pytest.mark.slow
def test_export_is_a_new_registered_model_version_each_time(finished: FinishedSearch, exported: Path,
                                                            tmp_path: Path) -> None:
    search = open_search(open_tracking(finished.tracking_uri), finished.name)
    client = MlflowClient(finished.tracking_uri)
    before = {int(v.version) for v in client.search_model_versions(f"name = '{finished.name}'")}
    done = export_best(search, tmp_path / "again")
    after = client.search_model_versions(f"name = '{finished.name}'")

    assert int(done.version.version) == max(before) + 1 and len(after) == len(before) + 1
    epoch_dir = f"export/epoch_{done.candidate.epoch}"
    logged = client.list_artifacts(done.version.run_id, epoch_dir)
    assert sorted(Path(a.path).name for a in logged) == sorted(EXPORTED_FILES)
    assert done.version.source.endswith(epoch_dir)


_ROUND_TRIP = textwrap.dedent("""
    import json, sys, tempfile
    from mmdet.apis import DetInferencer
    from mmengine.config import Config
    from mmengine.runner import Runner

    model = sys.argv[1]
    inferencer = DetInferencer(model=f"{model}/config.py", weights=f"{model}/checkpoint.pth", device="cpu",
                               show_progress=False)
    cfg = Config.fromfile(f"{model}/config.py")
    cfg.load_from = f"{model}/checkpoint.pth"
    cfg.work_dir = tempfile.mkdtemp()
    runner = Runner.from_cfg(cfg)
    runner.build_evaluator(cfg.val_evaluator)  # mmdet alone knows every evaluator the config names
    metrics = runner.test()
    with open(sys.argv[2], "w") as out:
        json.dump({"classes": list(inferencer.model.dataset_meta["classes"]), "metrics": metrics}, out)
""")


@pytest.mark.slow
def test_exported_model_reproduces_its_score_in_a_fresh_process(exported: Path, tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-c", _ROUND_TRIP, str(exported), str(tmp_path / "result.json")],
                   capture_output=True, check=True)
    result = json.loads((tmp_path / "result.json").read_text())
    expected = json.loads((exported / "metrics.json").read_text())["metrics"]

    assert result["classes"] == list(CLASSES)
    for key in VAL:
        if key in expected:
            assert abs(result["metrics"]["coco/" + key.split("/")[1]] - expected[key]) <= 0.001, key


def _fake_trial(root: Path, name: str, results: list[dict[str, Any]], kept: set[str], partial: bool = False) -> None:
    trial = root / name
    trial.mkdir(parents=True)
    lines = [json.dumps({"trial_id": name, **r}) for r in results]
    (trial / "result.json").write_text("\n".join(lines) + ("\n{\"trial_id\": " if partial else "\n"))
    for checkpoint in kept:
        (trial / checkpoint).mkdir()
        (trial / checkpoint / "checkpoint.pth").write_bytes(b"")
        (trial / checkpoint / "config.py").write_text("")


def test_only_checkpoints_on_disk_count_while_the_search_runs(tmp_path: Path) -> None:
    _fake_trial(tmp_path, "a", [{"epoch": 1, "val/bbox_mAP": 0.1, "checkpoint_dir_name": "checkpoint_000000"},
                                {"epoch": 2, "val/bbox_mAP": 0.3, "checkpoint_dir_name": "checkpoint_000001"}],
                kept={"checkpoint_000000"})  # epoch 2's checkpoint is gone
    _fake_trial(tmp_path, "b", [{"epoch": 1, "val/bbox_mAP": 0.2, "checkpoint_dir_name": "checkpoint_000000"}],
                kept={"checkpoint_000000"}, partial=True)  # Ray is writing its next line

    candidates = checkpoint_candidates(Storage.of(tmp_path))
    ranked = ranked_candidates(candidates, "val/bbox_mAP", "max")

    assert [(c.trial_id, c.epoch) for c in ranked] == [("b", 1), ("a", 1)]
    assert [c.trial_id for c in ranked_candidates(candidates, "val/bbox_mAP", "min")] == ["a", "b"]


def test_no_checkpoint_or_unknown_metric_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(NothingToExport, match="no trial checkpoint is on disk yet"):
        ranked_candidates(checkpoint_candidates(Storage.of(tmp_path)), "val/bbox_mAP", "max")
    _fake_trial(tmp_path, "a", [{"epoch": 1, "val/bbox_mAP": 0.1, "checkpoint_dir_name": "c"}], kept={"c"})
    with pytest.raises(BadArgument, match=r"no checkpoint has the metric 'val/bbox_mAP_xl'.*val/bbox_mAP"):
        ranked_candidates(checkpoint_candidates(Storage.of(tmp_path)), "val/bbox_mAP_xl", "max")


def test_metric_mode_follows_the_space_then_the_metrics_kind() -> None:
    space = load_space(Path(__file__).parents[2] / "spaces" / "demo.yaml")
    assert not space.objectives
    assert metric_mode(space, "val/bbox_mAP") == space.mode == "max"
    assert [metric_mode(space, m) for m in ("train/loss", "train/s1.loss_bbox", "train/acc", "val/bbox_mAP_s")] == [
        "min", "min", "max", "max"]
    assert [metric_mode(space, m) for m in ("model/gflops", "model/params_M", "inference/fps")] == ["min", "min", "max"]
    with pytest.raises(BadArgument, match="whether a higher or a lower train/lr is better"):
        metric_mode(space, "train/lr")


def test_an_objectives_mode_is_the_spaces() -> None:
    space = load_space(Path(__file__).parents[2] / "spaces" / "demo.yaml")
    space = space.model_copy(update={"objectives": [Objective(metric="model/params_M", mode="max")]})
    assert metric_mode(space, "model/params_M") == "max"  # the space's word wins over the kind's


def test_params_of_a_grid_over_lists_are_the_values_the_trial_trained(tmp_path: Path) -> None:
    space = load_space(Path(__file__).parents[2] / "spaces" / "scale-vs-small.yaml")
    # Tune's grid hands the trial the list itself (Optuna would have sent the text "[768, 768]").
    candidate = Candidate(trial_id="a", epoch=1, result={"config": {"scale": [768, 768]}},
                          source=Storage.of(tmp_path))

    assert trial_params(space, candidate) == {**space.fixed, "epochs": space.budget.epochs, "scale": [768, 768]}
