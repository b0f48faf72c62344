"""``dettune ensemble`` on a real finished search: members chosen on one half of val, scored on the other.

The search (four real trials on Ray, tiny Faster R-CNN, two epochs, a grid over the learning rate) runs once for
this module. The test recomputes every score itself: the held-out half from the sorted val ids, the fusion with
mmdet's ``weighted_boxes_fusion`` called here, the mAPs with pycocotools; what it takes from the code under test
is only the members' cached predictions, which it first checks against the scores the trials logged.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import runs_of, write_space
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from cocodata.dataset import Dataset
from results.ensemble import Fusion, NoTTA, fuse, greedy_selection, split_halves, tta_pipeline
from results.report import write_report
from results.store import open_search, open_tracking
from search.cli import main
from search.driver import SearchOptions, run_search
from tracking_names import TAG_STORAGE

NAME = "ens"
VAL = ["val/bbox_mAP", "val/bbox_mAP_50", "val/bbox_mAP_75", "val/bbox_mAP_s", "val/bbox_mAP_m", "val/bbox_mAP_l"]
FIXED = {"backbone": "r18", "preset": "tiny", "scale": [160, 160], "optimizer": "sgd", "batch_size": 4,
         "schedule": "cosine"}


@dataclass(frozen=True)
class Ensembled:
    storage: Path
    tracking_uri: str
    val_json: Path
    out: Path
    stdout: str
    cache_mtimes: dict[str, int]


@pytest.fixture(scope="module")
def ensembled(tmp_path_factory: pytest.TempPathFactory, synth_large: Dataset, ray_local: None) -> Ensembled:
    root = tmp_path_factory.mktemp("ensemble")
    space = write_space(root / "space.yaml", synth_large, name=NAME, metric="val/bbox_mAP", fixed=FIXED,
                        search={"algorithm": "grid", "seed": 0}, budget={"epochs": 2, "trials": 4, "max_concurrent": 4},
                        space={"lr": {"choice": [0.02, 0.01, 0.03, 0.005]}})
    outcome = run_search(SearchOptions(space_file=space, storage=root / "runs"))
    out = root / "out"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(["ensemble", NAME, "--storage", str(root / "runs"), "--top-k", "4", "--out", str(out)]) == 0
    cache = outcome.experiment_dir / "ensemble"
    return Ensembled(storage=root / "runs", tracking_uri=outcome.tracking_uri, out=out, stdout=stdout.getvalue(),
                     val_json=synth_large.root / synth_large.val,
                     cache_mtimes={p.name: p.stat().st_mtime_ns for p in cache.iterdir()})


def _quiet_coco(path: Path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def _map(gt: COCO, detections: Sequence[Mapping[str, Any]], image_ids: Sequence[int]) -> dict[str, float]:
    """pycocotools' six bbox mAPs of ``detections`` on ``image_ids``, by the log's names, -1 left out."""
    ids = set(image_ids)
    with contextlib.redirect_stdout(io.StringIO()):
        evaluation = COCOeval(gt, gt.loadRes([dict(d) for d in detections if d["image_id"] in ids]), "bbox")
        evaluation.params.imgIds = sorted(ids)
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return {key: float(value) for key, value in zip(VAL, evaluation.stats[:6], strict=True) if value != -1}


def _wbf(members: Sequence[Sequence[Mapping[str, Any]]], weights: Sequence[int], iou_thr: float,
         skip_box_thr: float, image_ids: Sequence[int]) -> list[dict[str, Any]]:
    """The members' detections fused here with mmdet's WBF, image by image (one member alone: as it is)."""
    from mmdet.models.utils import weighted_boxes_fusion

    if len(members) == 1:
        return [dict(d) for d in members[0] if d["image_id"] in set(image_ids)]
    fused = []
    for image_id in image_ids:
        own = [[d for d in member if d["image_id"] == image_id] for member in members]
        boxes = [[[x, y, x + w, y + h] for x, y, w, h in (d["bbox"] for d in dets)] for dets in own]
        boxes_out, scores, labels = weighted_boxes_fusion(
            boxes, [[d["score"] for d in dets] for dets in own], [[d["category_id"] for d in dets] for dets in own],
            weights=list(weights), iou_thr=iou_thr, skip_box_thr=skip_box_thr)
        fused += [{"image_id": image_id, "category_id": int(label), "bbox": [x1, y1, x2 - x1, y2 - y1],
                   "score": float(score)}
                  for (x1, y1, x2, y2), score, label in zip(boxes_out.tolist(), scores.tolist(), labels.tolist(),
                                                            strict=True)]
    return fused


def _ensemble_runs(tracking_uri: str) -> list[Run]:
    return sorted(runs_of(tracking_uri, NAME, role="ensemble"), key=lambda r: r.info.start_time)


def _logged_map(client: MlflowClient, run_id: str, epoch: int) -> float:
    (value,) = [m.value for m in client.get_metric_history(run_id, "val/bbox_mAP") if m.step == epoch]
    return value


@pytest.mark.slow
def test_held_out_scores_equal_the_tests_own_fusion_of_the_cached_predictions(ensembled: Ensembled) -> None:
    client = MlflowClient(ensembled.tracking_uri)
    trials = {r.data.tags["dettune.exp_num"]: r for r in runs_of(ensembled.tracking_uri, NAME)}
    (run, *_) = _ensemble_runs(ensembled.tracking_uri)
    params, metrics = run.data.params, run.data.metrics
    described = json.loads((ensembled.out / "ensemble.json").read_text())
    gt = _quiet_coco(ensembled.val_json)
    ordered = sorted(gt.getImgIds())
    selection, held_out = ordered[0::2], ordered[1::2]
    experiment_dir = Path(client.get_run(trials["ens-1"].data.tags["mlflow.parentRunId"]).data.tags[TAG_STORAGE])

    members = params["members"].split(",")
    weights = [int(w) for w in params["weights"].split(",")]
    predictions = {m["exp_num"]: json.loads((experiment_dir / m["predictions"]).read_text())
                   for m in described["members"]}
    # the cache holds each member's real predictions: on all of val they score what the trial logged at that epoch
    for member in described["members"]:
        full = _map(gt, predictions[member["exp_num"]], ordered)["val/bbox_mAP"]
        assert full == pytest.approx(_logged_map(client, member["mlflow_run_id"], member["epoch"]), abs=1e-9)
    assert sorted(predictions) == sorted(members) and all(w >= 1 for w in weights)

    fused_held_out = _wbf([predictions[m] for m in members], weights, float(params["fusion.iou_thr"]),
                          float(params["fusion.skip_box_thr"]), held_out)
    expected = _map(gt, fused_held_out, held_out)
    assert {k: v for k, v in metrics.items() if k.startswith("val/")} == pytest.approx(expected, abs=1e-9)

    # the best single trial, as the test ranks the trials from MLflow's raw histories, on the same half
    best = max(trials, key=lambda num: max(m.value for m in client.get_metric_history(trials[num].info.run_id,
                                                                                      "val/bbox_mAP")))
    single_held_out = _map(gt, predictions.get(best) or _cache_of(experiment_dir, trials[best]), held_out)
    assert {k.removeprefix("single/"): v for k, v in metrics.items() if k.startswith("single/val/")} == \
        pytest.approx(single_held_out, abs=1e-9)
    assert params["single"] == best

    # the members were chosen on the other half: the split, and the score the choice was made on
    assert described["split"]["selection"] == selection and described["split"]["held_out"] == held_out
    assert params["images.selection"] == str(len(selection)) and params["images.held_out"] == str(len(held_out))
    fused_selection = _wbf([predictions[m] for m in members], weights, float(params["fusion.iou_thr"]),
                           float(params["fusion.skip_box_thr"]), selection)
    chosen_on_selection = _map(gt, fused_selection, selection)["val/bbox_mAP"]
    assert described["selection_score"] == pytest.approx(chosen_on_selection, abs=1e-9)
    for num, run_of_trial in trials.items():  # greedy selection starts from the best single member
        alone = _map(gt, predictions.get(num) or _cache_of(experiment_dir, run_of_trial), selection)
        assert alone["val/bbox_mAP"] <= chosen_on_selection + 1e-12, num

    # the ensemble's speed: every chosen member's measured seconds per val image, plus the fusion
    seconds = {m["exp_num"]: json.loads((experiment_dir / m["predictions"].replace(".bbox.json", ".seconds.json"))
                                        .read_text())["seconds_per_image"] for m in described["members"]}
    assert sum(seconds.values()) <= 1 / metrics["inference/fps"] <= sum(seconds.values()) + 0.5
    if best in seconds:
        assert metrics["single/inference/fps"] == pytest.approx(1 / seconds[best])
    for cost in ("model/gflops", "model/params_M"):
        assert metrics[cost] == pytest.approx(sum(trials[m].data.metrics[cost] for m in members))
    assert run.data.tags["mlflow.parentRunId"] == trials["ens-1"].data.tags["mlflow.parentRunId"]
    assert f"ensemble {NAME}-ensemble-1: " in ensembled.stdout and "best single" in ensembled.stdout


def _cache_of(experiment_dir: Path, trial: Run) -> list[dict[str, Any]]:
    """A trial's cached predictions at its best epoch still on disk (every trial keeps both of its checkpoints)."""
    (path,) = [p for p in (experiment_dir / "ensemble").glob(f"{trial.data.tags['dettune.trial_id']}-epoch_*.bbox.json")
               if ".tta." not in p.name]
    loaded: list[dict[str, Any]] = json.loads(path.read_text())
    return loaded


@pytest.mark.slow
def test_a_second_call_with_other_settings_runs_no_model(ensembled: Ensembled, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    before = len(_ensemble_runs(ensembled.tracking_uri))
    code = main(["ensemble", NAME, "--storage", str(ensembled.storage), "--top-k", "2", "--fusion", "nms",
                 "--out", str(tmp_path)])
    (cache,) = {Path(d["predictions"]).parent for d in json.loads((tmp_path / "ensemble.json").read_text())["members"]}

    assert code == 0 and "(nms, " in capsys.readouterr().out
    experiment_dir = ensembled.storage / NAME
    assert {name: (experiment_dir / cache / name).stat().st_mtime_ns for name in ensembled.cache_mtimes} == \
        ensembled.cache_mtimes
    runs = _ensemble_runs(ensembled.tracking_uri)
    assert len(runs) == before + 1 and runs[-1].data.params["fusion"] == "nms"
    assert runs[-1].info.run_name == f"{NAME}-ensemble-{before + 1}"
    assert set(runs[-1].data.params["members"].split(",")) <= {"ens-1", "ens-2", "ens-3", "ens-4"}


@pytest.mark.slow
def test_bad_input_exits_2_with_the_fix_and_writes_nothing(ensembled: Ensembled, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    # a copy of the store whose search points at a Ray directory that has lost every checkpoint
    shutil.copy(ensembled.storage / "mlflow.db", tmp_path / "mlflow.db")
    copy_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(copy_uri)
    (parent,) = runs_of(copy_uri, NAME, role="parent")
    (tmp_path / "emptied").mkdir()
    client.set_tag(parent.info.run_id, TAG_STORAGE, str(tmp_path / "emptied"))
    before = {uri: len(_ensemble_runs(uri)) for uri in (ensembled.tracking_uri, copy_uri)}
    cases = {("nope", "--storage", str(ensembled.storage)): "no search named 'nope'",
             (NAME, "--storage", str(ensembled.storage), "--top-k", "0"): "--top-k is 0, but must be at least 1",
             (NAME, "--tracking-uri", copy_uri): "has a checkpoint left"}

    for argv, message in cases.items():
        code = main(["ensemble", *argv, "--out", str(tmp_path / "out")])
        error = capsys.readouterr().err
        assert code == 2 and message in error and "Traceback" not in error, argv
    code = main(["export", NAME, "--tracking-uri", ensembled.tracking_uri, "--ensemble", f"{NAME}-1", "--out",
                 str(tmp_path / "out")])
    error = capsys.readouterr().err
    assert code == 2 and f"'{NAME}-1' is not an ensemble run of {NAME} (it has: {NAME}-ensemble-1" in error
    assert {uri: len(_ensemble_runs(uri)) for uri in before} == before
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_an_exported_ensemble_predicts_the_boxes_of_its_run(ensembled: Ensembled, tmp_path: Path) -> None:
    model = tmp_path / "model"
    assert main(["export", NAME, "--tracking-uri", ensembled.tracking_uri, "--ensemble", f"{NAME}-ensemble-1",
                 "--out", str(model)]) == 0
    described = json.loads((ensembled.out / "ensemble.json").read_text())
    gt = _quiet_coco(ensembled.val_json)
    chosen = sorted(gt.getImgIds())[1::2][:3]
    images = [ensembled.val_json.parent / "images" / gt.imgs[i]["file_name"] for i in chosen]
    assert main(["predict", str(model), *map(str, images), "--score-thr", "0", "--out", str(tmp_path / "out")]) == 0
    predicted = json.loads((tmp_path / "out" / "predictions.json").read_text())
    cached = [json.loads((ensembled.storage / NAME / m["predictions"]).read_text()) for m in described["members"]]
    fused = _wbf(cached, [m["weight"] for m in described["members"]], described["fusion"]["iou_thr"],
                 described["fusion"]["skip_box_thr"], chosen)
    names = {c["id"]: c["name"] for c in gt.dataset["categories"]}

    assert sorted(p.name for p in (model / "members").iterdir()) == sorted(m["exp_num"] for m in described["members"])
    for image_id, image, listed in zip(chosen, images, predicted, strict=True):
        own = sorted((names[d["category_id"]], round(d["score"], 4), [round(v, 2) for v in _corners(d["bbox"])])
                     for d in fused if d["image_id"] == image_id)
        got = sorted(zip(listed["labels"], listed["scores"], listed["boxes"], strict=True))
        assert listed["image"] == str(image) and len(got) == len(own) > 0
        for (label, score, box), (own_label, own_score, own_box) in zip(got, own, strict=True):
            assert label == own_label and score == pytest.approx(own_score, abs=1e-4)
            assert box == pytest.approx(own_box, abs=0.011)


def _corners(bbox: Sequence[float]) -> list[float]:
    x, y, w, h = bbox
    return [x, y, x + w, y + h]


@pytest.mark.slow
def test_tta_is_a_candidate_of_its_own(ensembled: Ensembled, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["ensemble", NAME, "--storage", str(ensembled.storage), "--top-k", "1", "--tta", "--out",
                 str(tmp_path)])
    run = _ensemble_runs(ensembled.tracking_uri)[-1]
    params, metrics = run.data.params, run.data.metrics
    described = json.loads((tmp_path / "ensemble.json").read_text())
    cache = ensembled.storage / NAME / "ensemble"
    (tta_file,) = {p.name for p in cache.glob("*.bbox.json")} - set(ensembled.cache_mtimes)
    plain = json.loads((cache / tta_file.replace(".tta.", ".")).read_text())
    tta = json.loads((cache / tta_file).read_text())
    gt = _quiet_coco(ensembled.val_json)
    held_out = sorted(gt.getImgIds())[1::2]

    assert code == 0 and "best single + TTA" in capsys.readouterr().out and params["tta"] == "on"
    assert {name: (cache / name).stat().st_mtime_ns for name in ensembled.cache_mtimes} == ensembled.cache_mtimes
    assert tta and tta != plain
    tta_seconds = json.loads((cache / tta_file.replace(".bbox.json", ".seconds.json")).read_text())
    assert metrics["single_tta/inference/fps"] == pytest.approx(1 / tta_seconds["seconds_per_image"])
    for d in tta:  # boxes flipped back into the image they were found on
        image = gt.imgs[d["image_id"]]
        x, y, w, h = d["bbox"]
        assert -1e-3 <= x <= x + w <= image["width"] + 1e-3 and -1e-3 <= y <= y + h <= image["height"] + 1e-3
    variants = {params["single"]: plain, params["single"] + "+tta": tta}
    assert {k.removeprefix("single_tta/"): v for k, v in metrics.items() if k.startswith("single_tta/val/")} == \
        pytest.approx(_map(gt, tta, held_out), abs=1e-9)
    members = params["members"].split(",")
    weights = [int(w) for w in params["weights"].split(",")]
    assert [m["predictions"] for m in described["members"]] == [
        f"ensemble/{tta_file if name.endswith('+tta') else tta_file.replace('.tta.', '.')}" for name in members]
    fused = _wbf([variants[m] for m in members], weights, float(params["fusion.iou_thr"]),
                 float(params["fusion.skip_box_thr"]), held_out)
    assert {k: v for k, v in metrics.items() if k.startswith("val/")} == pytest.approx(_map(gt, fused, held_out),
                                                                                      abs=1e-9)


@pytest.mark.slow
def test_the_report_lists_each_ensemble_against_the_best_single_trial(ensembled: Ensembled, tmp_path: Path) -> None:
    runs = _ensemble_runs(ensembled.tracking_uri)
    path = write_report(open_search(open_tracking(ensembled.tracking_uri), NAME), tmp_path)
    text = path.read_text()
    section = text[text.index("## Ensembles"):].split("\n## ")[0]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in section.splitlines()
            if line.startswith("| ") and not line.startswith("| Model")]

    single = runs[-1].data.params["single"]
    assert rows[0][:2] == ["best single trial", single]
    assert rows[0][3] == f"{100 * runs[-1].data.metrics['single/val/bbox_mAP']:.1f}"
    assert rows[0][2] == f"{runs[-1].data.metrics['single/inference/fps']:.1f}"
    by_name = {row[0]: row for row in rows}
    for run in runs:
        assert by_name[run.info.run_name][3] == f"{100 * run.data.metrics['val/bbox_mAP']:.1f}"
        assert by_name[run.info.run_name][2] == f"{run.data.metrics['inference/fps']:.1f}"
        assert by_name[run.info.run_name][1].endswith(f"({run.data.params['fusion']})")
    assert f"held-out half of val ({runs[-1].data.params['images.held_out']} images" in section


def test_tta_pipeline_varies_the_trials_resize_and_keeps_the_flip() -> None:
    pipeline = [{"type": "LoadImageFromFile"}, {"type": "Resize", "scale": (160, 120), "keep_ratio": True},
                {"type": "LoadAnnotations", "with_bbox": True}, {"type": "PackDetInputs", "meta_keys": ("img_id",)}]
    (load, tta) = tta_pipeline(pipeline)
    resize, flip, annotations, pack = tta["transforms"]

    assert load == pipeline[0] and tta["type"] == "TestTimeAug"
    assert [r["scale"] for r in resize] == [(128, 96), (160, 120), (200, 150)] and all(r["keep_ratio"] for r in resize)
    assert [f["prob"] for f in flip] == [1.0, 0.0] and annotations == [pipeline[2]]
    assert pack == [{"type": "PackDetInputs", "meta_keys": ("img_id", "flip", "flip_direction")}]
    with pytest.raises(NoTTA, match="leave out --tta"):
        tta_pipeline([{"type": "LoadImageFromFile"}, {"type": "PackDetInputs"}])


def test_split_alternates_sorted_ids() -> None:
    assert split_halves([9, 2, 5, 1, 7]) == ([1, 5, 9], [2, 7])
    assert split_halves([4]) == ([4], [])


def test_greedy_selection_adds_the_best_member_until_nothing_helps() -> None:
    table = {(0, 1, 0): 0.3, (1, 0, 0): 0.2, (0, 0, 1): 0.1, (1, 1, 0): 0.35, (0, 2, 0): 0.3, (0, 1, 1): 0.32,
             (1, 2, 0): 0.4, (2, 1, 0): 0.36, (1, 1, 1): 0.34}

    def score(weights: tuple[int, ...]) -> float:
        return table.get(weights, 0.0)

    assert greedy_selection(score, 3, max_steps=10) == ((1, 2, 0), 0.4)  # the second member added twice: weight 2
    assert greedy_selection(score, 3, max_steps=1) == ((0, 1, 0), 0.3)
    assert greedy_selection(lambda w: 0.5, 2, max_steps=5) == ((1, 0), 0.5)  # ties: the better ranked member


def test_one_member_is_left_as_it_is_and_nms_keeps_the_heavier_member() -> None:
    box = {"image_id": 1, "category_id": 3, "bbox": [10.0, 10.0, 20.0, 20.0], "score": 0.6}
    shifted = {**box, "bbox": [11.0, 10.0, 20.0, 20.0], "score": 0.9}
    other_class = {**box, "category_id": 4}
    a, b = {1: [box, other_class]}, {1: [shifted]}

    assert fuse([a, b], [1, 0], Fusion("wbf", 0.5, 0.0), [1]) == [box, other_class]
    kept = fuse([a, b], [3, 1], Fusion("nms", 0.5, 0.0), [1])  # 0.6 * 3/3 beats 0.9 * 1/3
    assert sorted((d["category_id"], d["bbox"], round(d["score"], 6)) for d in kept) == [
        (3, [10.0, 10.0, 20.0, 20.0], 0.6), (4, [10.0, 10.0, 20.0, 20.0], 0.6)]
