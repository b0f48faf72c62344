"""The dataset check: every defect a real export carries, alone, in train and in val, through `dettune validate`.

Each test copies a clean synthetic dataset and breaks one thing in it with :mod:`cocodata.defects`; the
expectations (which item, which kind, refused or not) come from the defect table and from decoding the files
with mmcv, the loader training uses, not from the check itself.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import mmcv
import numpy as np
import pytest
from conftest import write_space
from pycocotools.cocoeval import Params

from cocodata.datacheck import DatasetCard, check_dataset
from cocodata.dataset import Dataset, open_dataset
from cocodata.defects import DEFECTS, apply_defect, write_defects
from search.cli import USAGE_ERROR, main

ERRORS = [name for name, (outcome, _, _) in DEFECTS.items() if outcome == "error"]
FINE = [name for name, (outcome, _, _) in DEFECTS.items() if outcome == "fine"]


@pytest.fixture
def clean(synth: Dataset) -> Path:
    return synth.root


def copy_of(clean: Path, into: Path) -> Path:
    root = into / "data"
    shutil.copytree(clean, root)
    return root


def run(capfd: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capfd.readouterr()
    code = main(list(argv))
    out, err = capfd.readouterr()
    return code, out, err


@pytest.mark.parametrize("split", ["train", "val"])
@pytest.mark.parametrize("defect", ERRORS)
def test_each_error_alone_is_refused_by_validate_naming_file_and_kind(
        defect: str, split: str, clean: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    root = copy_of(clean, tmp_path)
    item = apply_defect(root, defect, split, index=1)
    kind = DEFECTS[defect][1]
    space = write_space(tmp_path / "space.yaml", open_dataset(clean, "train.json", "val.json"),
                        data={"root": str(root), "train": "train.json", "val": "val.json"})
    code, out, err = run(capfd, "validate", str(space))
    assert code == USAGE_ERROR, out + err
    lines = [line for line in err.splitlines() if f"{kind} (" in line]
    assert len(lines) == 1, err
    assert f"data.{split}" in lines[0] and f"{split}.json" in lines[0]
    image_file = item.split(" of ")[-1]  # "annotation 7 of 000002.png" or "000002.png"
    assert image_file in lines[0], err
    assert f"dettune data check {root}" in err
    assert "Traceback" not in out + err
    # Only the defect's own kind is an error: no other kind of problem is reported beside it.
    assert sum(1 for line in err.splitlines() if ".json: " in line and "data." in line) == 1, err


@pytest.mark.parametrize("defect", FINE)
def test_images_mmdet_reads_fine_pass_the_check(defect: str, clean: Path, tmp_path: Path) -> None:
    root = copy_of(clean, tmp_path)
    name = apply_defect(root, defect, "train", index=1)
    image = next(i for i in json.loads((root / "train.json").read_text())["images"] if i["file_name"] == name)
    decoded = mmcv.imfrombytes((root / "images" / name).read_bytes())  # mmdet's LoadImageFromFile, its defaults
    assert decoded.dtype == np.uint8 and decoded.shape == (image["height"], image["width"], 3)
    assert check_dataset(root, "train.json", "val.json").errors == []


def test_warnings_do_not_refuse(clean: Path, tmp_path: Path) -> None:
    root = copy_of(clean, tmp_path)
    empty = apply_defect(root, "without-objects", "train", index=2)
    absent = apply_defect(root, "class-absent", "val", index=0)
    checked = check_dataset(root, "train.json", "val.json")
    assert checked.errors == []
    assert {(f.split, f.kind, f.item) for f in checked.warnings} == {
        ("train.json", "image without objects", empty), ("val.json", "class absent from val", absent)}


def test_malformed_coco_names_file_and_field(clean: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    root = copy_of(clean, tmp_path)
    doc = json.loads((root / "val.json").read_text())
    del doc["images"][2]["width"]
    doc["annotations"][0]["bbox"] = "12 4 5 6"
    doc["categories"][1]["id"] = "2"
    (root / "val.json").write_text(json.dumps(doc))
    code, out, err = run(capfd, "data", "check", str(root))
    assert code == USAGE_ERROR
    for words in ("images[2].width is missing", "annotations[0].bbox = '12 4 5 6' is not a list",
                  "categories[1].id = '2' is not an integer"):
        assert words in err, err
    assert str(root / "val.json") in err and "Traceback" not in out + err


def test_data_check_lists_every_defect_of_the_defects_dataset(tmp_path: Path,
                                                               capfd: pytest.CaptureFixture[str]) -> None:
    placed = write_defects(tmp_path / "d")
    code, _, err = run(capfd, "data", "check", str(tmp_path / "d"))
    assert code == USAGE_ERROR
    for defect, outcome, split, item in placed:
        kind = DEFECTS[defect][1]
        lines = [line for line in err.splitlines() if line.strip().startswith(f"{split}.json: {kind} (")]
        if outcome == "fine":
            assert not any(item in line for line in err.splitlines() if ": image" in line), (defect, err)
        else:
            assert lines and item.split(" of ")[-1] in lines[0], (defect, err)


def test_the_cache_decodes_only_changed_files(clean: Path, tmp_path: Path) -> None:
    root = copy_of(clean, tmp_path)
    files = len(list((root / "images").iterdir()))
    assert check_dataset(root, "train.json", "val.json").decoded == files
    assert check_dataset(root, "train.json", "val.json").decoded == 0
    # Truncated after the check, its modification time put back: the size alone shows it changed.
    victim = root / "images" / json.loads((root / "val.json").read_text())["images"][0]["file_name"]
    stat = victim.stat()
    victim.write_bytes(victim.read_bytes()[:100])
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    again = check_dataset(root, "train.json", "val.json")
    assert again.decoded == 1
    assert [(f.kind, f.item.split(" ")[0]) for f in again.errors] == [("image unreadable", victim.name)]


def test_the_cache_lives_in_the_user_cache_never_in_the_dataset(clean: Path, tmp_path: Path,
                                                                  private_cache: Path) -> None:
    root = copy_of(clean, tmp_path)
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    check_dataset(root, "train.json", "val.json")
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before
    assert list((private_cache / "dettune" / "imagescan").glob("*.json"))


def test_a_clean_dataset_has_a_card(synth: Dataset) -> None:
    checked = check_dataset(synth.root, synth.train, synth.val)
    assert checked.errors == [] and checked.warnings == []
    train = json.loads((synth.root / synth.train).read_text())
    card = checked.card[synth.train]
    assert (card.images, card.objects) == (len(train["images"]), len(train["annotations"]))
    assert sum(card.per_class.values()) == card.objects == sum(card.per_area.values())


def test_the_card_counts_area_ranges_as_coco_evaluation_does(synth: Dataset) -> None:
    checked = check_dataset(synth.root, synth.train, synth.val)
    _, small, medium, large = Params(iouType="bbox").areaRng  # all, then COCOeval's small, medium and large
    for split, card in checked.card.items():
        areas = [a["area"] for a in json.loads((synth.root / split).read_text())["annotations"]]
        assert Counter({name: sum(low <= area < high for area in areas) for name, (low, high)
                        in (("small", small), ("medium", medium), ("large", large))}) == card.per_area
    assert DatasetCard.from_json(json.loads(json.dumps(checked.dataset_card.to_json()))) == checked.dataset_card
