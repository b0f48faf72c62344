"""``dettune predict``: an exported model on images, drawn and listed, with its measured speed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_report import FinishedSearch, finished_search

from results.export import export_best
from results.predict import PREDICTIONS_FILE, predict
from results.store import open_search, open_tracking
from spaces.dataset import Dataset
from spaces.errors import BadArgument, NotFound
from spaces.synth import CLASSES

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, synth_large: Dataset, ray_local: None) -> Path:
    finished: FinishedSearch = finished_search(tmp_path_factory, synth_large)
    out = tmp_path_factory.mktemp("predict") / "model"
    export_best(open_search(open_tracking(finished.tracking_uri), finished.name), out)
    return out


def _val_images(dataset: Dataset, count: int) -> list[Path]:
    images = json.loads(dataset.val_json.read_text())["images"][:count]
    return [dataset.root / dataset.images / image["file_name"] for image in images]


@pytest.mark.slow
def test_predict_writes_a_drawing_and_json_per_image(model_dir: Path, synth_large: Dataset, tmp_path: Path) -> None:
    images = _val_images(synth_large, 2)
    done = predict(model_dir, images, tmp_path, score_thr=0.05, device="cpu")
    listed = json.loads((tmp_path / PREDICTIONS_FILE).read_text())

    assert done.fps > 0 and done.device == "cpu"
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
