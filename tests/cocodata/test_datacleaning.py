"""``data: {on_bad: skip}``: each defect the check refuses, alone, in train and in val, is left out of the cleaned
annotation files (or its box clipped), said why, and nothing else goes; the user's files are not touched.

The expectations come from the defect table (:mod:`cocodata.defects`: which item, which kind) and from checking
the cleaned files again, not from the cleaning itself.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import file_digests

from cocodata.datacheck import check_dataset
from cocodata.datacleaning import Cleaned, can_clean, clean
from cocodata.dataset import Dataset
from cocodata.defects import DEFECTS, apply_defect

ERRORS = [name for name, (outcome, _, _) in DEFECTS.items() if outcome == "error"]


def cleaned_copy(synth: Dataset, tmp_path: Path, defect: str, split: str, *, clip: bool) -> tuple[Path, str, Cleaned]:
    root = tmp_path / "data"
    shutil.copytree(synth.root, root)
    item = apply_defect(root, defect, split, index=1)
    before = file_digests(root)
    checked = check_dataset(root, "train.json", "val.json")
    assert can_clean(checked)
    cleaned = clean(checked, clip=clip)
    paths = cleaned.write(tmp_path / "cleaned")
    assert file_digests(root) == before, "cleaning changed the user's files"
    for name, path in paths.items():  # the cleaned files beside the originals, so their image names resolve
        shutil.copy(path, root / f"cleaned-{name}")
    return root, item, cleaned


@pytest.mark.parametrize("split", ["train", "val"])
@pytest.mark.parametrize("defect", ERRORS)
def test_each_error_alone_is_left_out_and_the_rest_kept(defect: str, split: str, synth: Dataset,
                                                         tmp_path: Path) -> None:
    root, item, cleaned = cleaned_copy(synth, tmp_path, defect, split, clip=False)
    kind = DEFECTS[defect][1]
    left = cleaned.images if item == item.split(" of ")[-1] else cleaned.boxes  # an image file, or "annotation N of F"
    assert (f"{split}.json", item, kind) in {(i.split, i.item, i.reason) for i in left}
    assert not cleaned.clipped
    again = check_dataset(root, "cleaned-train.json", "cleaned-val.json")
    assert again.errors == [], again.errors
    original = json.loads((root / f"{split}.json").read_text())
    kept = json.loads((root / f"cleaned-{split}.json").read_text())
    # Nothing but the defect's own items (and the boxes of an image that went) is gone.
    gone_images = len(original["images"]) - len(kept["images"])
    assert gone_images == len(cleaned.images)
    gone_boxes = len(original["annotations"]) - len(kept["annotations"])
    assert gone_boxes == len(cleaned.boxes)
    assert {b.reason for b in cleaned.boxes} <= {kind, "its image was left out"}
    other = "val" if split == "train" else "train"
    assert json.loads((root / f"{other}.json").read_text()) == json.loads((root / f"cleaned-{other}.json").read_text())


def test_clip_keeps_a_box_outside_its_image_clipped_to_it(synth: Dataset, tmp_path: Path) -> None:
    root, item, cleaned = cleaned_copy(synth, tmp_path, "box-outside", "train", clip=True)
    assert cleaned.images == () and cleaned.boxes == ()
    assert [c.item for c in cleaned.clipped] == [item]
    ann_id = int(item.split()[1])
    original = json.loads((root / "train.json").read_text())
    kept = json.loads((root / "cleaned-train.json").read_text())
    (before,) = [a for a in original["annotations"] if a["id"] == ann_id]
    (after,) = [a for a in kept["annotations"] if a["id"] == ann_id]
    width = next(i["width"] for i in original["images"] if i["id"] == before["image_id"])
    x, y, w, h = before["bbox"]
    assert after["bbox"] == pytest.approx([x, y, width - x, h])  # the defect pushes it past the right edge only
    assert check_dataset(root, "cleaned-train.json", "cleaned-val.json").errors == []


def test_categories_that_differ_between_splits_cannot_be_cleaned(synth: Dataset, tmp_path: Path) -> None:
    root = tmp_path / "data"
    shutil.copytree(synth.root, root)
    val = json.loads((root / "val.json").read_text())
    val["categories"][0]["name"] = "renamed"
    (root / "val.json").write_text(json.dumps(val))
    assert not can_clean(check_dataset(root, "train.json", "val.json"))


def test_splits_whose_files_share_a_name_are_written_apart(tmp_path: Path) -> None:
    docs = {"train/ann.json": {"images": [1]}, "val/ann.json": {"images": [2]}}
    paths = Cleaned(docs=docs, images=(), boxes=(), clipped=()).write(tmp_path)
    assert {name: json.loads(path.read_text()) for name, path in paths.items()} == docs
