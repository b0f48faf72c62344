"""``dettune predict``: an exported model on images, drawn and listed, with its measured speed."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import pytest
from test_report import FinishedSearch, finished_search

from cocodata.dataset import Dataset
from cocodata.synth import CLASSES
from mmconfigs.build import load_config
from results.export import export_best
from results.predict import PREDICTIONS_FILE, SUBMISSION_HEADER, InputImage, input_images, predict
from results.store import open_search, open_tracking
from search.cli import main
from spaces.errors import BadArgument, NotFound
from trainers.checkpoint import CHECKPOINT_FILE, TRIAL_CONFIG

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, synth_large: Dataset, ray_local: None) -> Path:
    finished: FinishedSearch = finished_search(tmp_path_factory, synth_large)
    out = tmp_path_factory.mktemp("predict") / "model"
    export_best(open_search(open_tracking(finished.tracking_uri), finished.name), out)
    return out


def _independent_fps(model_dir: Path, images: list[Path]) -> float:
    """Batch-1 images per second of the exported model, timed here with mmdet's own inferencer and a plain clock."""
    from mmdet.apis import DetInferencer

    cfg = load_config(model_dir / TRIAL_CONFIG)
    cfg.visualizer.pop("vis_backends", None)
    inferencer = DetInferencer(model=cfg, weights=str(model_dir / CHECKPOINT_FILE), device="cpu", show_progress=False)
    inferencer(str(images[0]))  # first call: lazy initialisation, not inference
    start = time.perf_counter()
    for image in images:
        inferencer(str(image))
    return len(images) / (time.perf_counter() - start)


def _val_images(dataset: Dataset, count: int) -> list[Path]:
    images = json.loads(dataset.val_json.read_text())["images"][:count]
    return [dataset.root / dataset.images / image["file_name"] for image in images]


@pytest.mark.slow
def test_predict_writes_a_drawing_and_json_per_image(model_dir: Path, synth_large: Dataset, tmp_path: Path) -> None:
    images = _val_images(synth_large, 2)
    done = predict(model_dir, images, tmp_path, score_thr=0.05, device="cpu")
    listed = json.loads((tmp_path / PREDICTIONS_FILE).read_text())

    assert done.device == "cpu"
    reference = _independent_fps(model_dir, images * 3)
    assert reference / 5 < done.fps < reference * 5, f"predict says {done.fps:.1f} FPS, timed here {reference:.1f}"
    assert [Path(item["image"]) for item in listed] == images
    for item in listed:
        assert Path(item["drawn"]).read_bytes().startswith(PNG)
        assert len(item["boxes"]) == len(item["labels"]) == len(item["scores"])
        assert set(item["labels"]) <= set(CLASSES)
        assert all(score >= 0.05 for score in item["scores"])
        assert all(len(box) == 4 and box[0] <= box[2] and box[1] <= box[3] for box in item["boxes"])
    assert sum(len(item["boxes"]) for item in listed) > 0, "a trained model finds something at 0.05"


@pytest.mark.slow
def test_same_image_twice_gets_two_drawings(model_dir: Path, synth_large: Dataset, tmp_path: Path) -> None:
    image = _val_images(synth_large, 1)[0]
    done = predict(model_dir, [image, image], tmp_path, score_thr=0.5)
    assert [p.drawn.name for p in done.predictions] == [f"{image.stem}.png", f"{image.stem}-1.png"]


def test_bad_inputs_are_user_errors_before_the_model_loads(synth: Dataset, tmp_path: Path) -> None:
    image = _val_images(synth, 1)[0]
    with pytest.raises(NotFound, match="is not an exported model"):
        predict(tmp_path, [image], tmp_path / "out")
    (tmp_path / "config.py").write_text("")
    (tmp_path / "checkpoint.pth").write_bytes(b"")
    with pytest.raises(NotFound, match="no such image: .*missing.png"):
        predict(tmp_path, [tmp_path / "missing.png"], tmp_path / "out")
    with pytest.raises(BadArgument, match="--score-thr is 1.5"):
        predict(tmp_path, [image], tmp_path / "out", score_thr=1.5)
    with pytest.raises(BadArgument, match="--device cuda:99, but torch .* sees"):  # no machine has 100 GPUs
        predict(tmp_path, [image], tmp_path / "out", device="cuda:99")
    with pytest.raises(BadArgument, match="--device gpu0 is not a torch device"):
        predict(tmp_path, [image], tmp_path / "out", device="gpu0")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_submission_csv_has_one_row_per_image_of_a_coco_json(model_dir: Path, synth_large: Dataset,
                                                             tmp_path: Path) -> None:
    from mmdet.apis import DetInferencer

    listed = json.loads(synth_large.val_json.read_text())["images"][:3]
    test_json = tmp_path / "test.json"
    test_json.write_text(json.dumps({"images": listed}))
    root = synth_large.root / synth_large.images
    code = main(["predict", str(model_dir), str(test_json), "--images-root", str(root), "--format", "submission",
                 "--out", str(tmp_path / "out")])
    with (tmp_path / "out" / "submission.csv").open(newline="") as file:
        rows = list(csv.reader(file))
    cfg = load_config(model_dir / TRIAL_CONFIG)
    cfg.visualizer.pop("vis_backends", None)
    inferencer = DetInferencer(model=cfg, weights=str(model_dir / CHECKPOINT_FILE), device="cpu", show_progress=False)

    assert code == 0 and tuple(rows[0]) == SUBMISSION_HEADER
    assert [row[1] for row in rows[1:]] == [image["file_name"] for image in listed]
    assert not list((tmp_path / "out").glob("*.png")), "a submission draws nothing"
    for (prediction_string, _), image in zip(rows[1:], listed, strict=True):
        values = prediction_string.split()
        boxes = [values[i:i + 6] for i in range(0, len(values), 6)]
        found = inferencer(str(root / image["file_name"]))["predictions"][0]
        assert len(values) % 6 == 0 and len(boxes) == len(found["scores"]), "every box the model keeps"
        for (label, score, *box), own_label, own_score, own_box in zip(
                boxes, found["labels"], found["scores"], found["bboxes"], strict=True):
            assert int(label) == own_label and float(score) == pytest.approx(own_score, abs=1e-4)
            assert [float(v) for v in box] == pytest.approx(own_box, abs=0.01)


def test_inputs_are_files_folders_and_coco_jsons(tmp_path: Path) -> None:
    (tmp_path / "folder").mkdir()
    for name in ("b.jpg", "a.PNG", "notes.txt"):
        (tmp_path / "folder" / name).write_bytes(b"")
    (tmp_path / "test.json").write_text(json.dumps({"images": [{"id": 1, "file_name": "test/0001.jpg"}]}))
    (tmp_path / "broken.json").write_text("{")

    assert input_images([tmp_path / "folder", tmp_path / "test.json", tmp_path / "x.jpg"]) == [
        InputImage(tmp_path / "folder" / "a.PNG", "a.PNG"), InputImage(tmp_path / "folder" / "b.jpg", "b.jpg"),
        InputImage(tmp_path / "test" / "0001.jpg", "test/0001.jpg"), InputImage(tmp_path / "x.jpg", "x.jpg")]
    assert input_images([tmp_path / "test.json"], tmp_path / "data") == [
        InputImage(tmp_path / "data" / "test" / "0001.jpg", "test/0001.jpg")]
    with pytest.raises(BadArgument, match="broken.json is not a COCO json"):
        input_images([tmp_path / "broken.json"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadArgument, match="holds no image"):
        input_images([tmp_path / "empty"])
