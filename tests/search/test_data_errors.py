"""A sample that can't be read during a search (a file broken after the check) fails its trial at once, never
retried, naming the file; the console says to run `dettune data check`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from conftest import file_digests, write_space
from mlflow.tracking import MlflowClient
from mmdet.datasets import CocoDataset
from mmdet.utils import register_all_modules
from ray.tune import ExperimentAnalysis

from cocodata.datacheck import check_dataset
from cocodata.datacleaning import LEFT_OUT_FILE, TAG_LEFT_OUT
from cocodata.dataset import Dataset
from cocodata.defects import apply_defect
from results.store import open_search
from search import driver
from search.cli import main
from tracking_names import TAG_FAILURE, TAG_STATUS
from trainers.trial import sample_read_error

RUNNER_STARTS = "System environment:"  # mmengine logs it once per Runner, so once per attempt


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])


def first_val_image(root: Path) -> Path:
    return root / "images" / json.loads((root / "val.json").read_text())["images"][0]["file_name"]


def test_an_image_broken_after_the_check_fails_one_trial_at_once_naming_it(
        tmp_path: Path, synth: Dataset, ray_local: None, capfd: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "data"
    shutil.copytree(synth.root, root)
    victim = first_val_image(root)
    checked = driver.check_space

    def check_then_break(*args: Any, **kwargs: Any) -> Any:
        validation = checked(*args, **kwargs)  # every image decoded, and cached, whole
        truncate(victim)
        return validation

    monkeypatch.setattr(driver, "check_space", check_then_break)
    # Two CPUs per trial: one data loader worker, so the error crosses a process as text, as on a real machine.
    space_file = write_space(tmp_path / "space.yaml", synth, name="bad",
                             data={"root": str(root), "train": synth.train, "val": synth.val},
                             budget={"epochs": 2, "trials": 1, "max_concurrent": 1, "max_retries": 2,
                                     "cpus_per_worker": 2})

    status = main(["search", str(space_file), "--storage", str(tmp_path / "runs")])

    console = capfd.readouterr()
    assert status == 1, console.err[-2000:]
    experiment = tmp_path / "runs" / "bad"
    (trial,) = ExperimentAnalysis(str(experiment)).trials
    assert trial.run_metadata.num_failures == 0, "a data error was retried"
    (log,) = (experiment / "trials").glob("*/rank0/trial.log")
    assert log.read_text().count(RUNNER_STARTS) == 1, "the trial was attempted twice"
    failed = [line for line in console.out.splitlines() if f"trial {trial.trial_id}: failed: " in line]
    assert len(failed) == 1 and str(victim) in failed[0] and "(not retried)" in failed[0], console.out
    assert "retried, attempt" not in console.out
    assert f"dettune data check {root}" in console.out
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("bad").experiment_id],
                                "tags.`dettune.role` = 'trial'")
    assert run.data.tags[TAG_STATUS] == "failed" and str(victim) in run.data.tags[TAG_FAILURE]
    # The check's cache saw the change: checked again, the file is named.
    assert [f.item.split(" ")[0] for f in check_dataset(root, synth.train, synth.val).errors] == [victim.name]


def test_a_sample_read_in_this_process_is_named_by_its_dataset_index(tmp_path: Path, synth: Dataset) -> None:
    root = tmp_path / "data"
    shutil.copytree(synth.root, root)
    victim = first_val_image(root)
    truncate(victim)
    register_all_modules()
    dataset = CocoDataset(data_root=str(root), ann_file=synth.val, data_prefix={"img": "images/"},
                          pipeline=[{"type": "LoadImageFromFile"}], metainfo={"classes": synth.classes})
    with pytest.raises(Exception) as raised:
        dataset[0]
    reason = sample_read_error(raised.value, root)
    assert reason is not None and reason.startswith(f"{victim}: ")
    assert sample_read_error(ValueError("a loss went wrong"), root) is None


def test_on_bad_skip_trains_on_a_cleaned_copy_and_says_what_it_left_out(
        tmp_path: Path, synth: Dataset, ray_local: None, capfd: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "data"
    shutil.copytree(synth.root, root)
    unreadable = apply_defect(root, "truncated", "train", index=1)
    no_area = apply_defect(root, "box-without-area", "train", index=2)
    outside = apply_defect(root, "box-outside", "train", index=3)
    nan = apply_defect(root, "box-nan", "val", index=1)
    train = json.loads((root / "train.json").read_text())
    image_id = next(i["id"] for i in train["images"] if i["file_name"] == unreadable)
    its_boxes = sum(1 for a in train["annotations"] if a["image_id"] == image_id)
    before = file_digests(root)
    space_file = write_space(tmp_path / "space.yaml", synth, name="skip",
                             data={"root": str(root), "train": synth.train, "val": synth.val,
                                   "on_bad": {"boxes": "clip"}},
                             budget={"epochs": 1, "trials": 1, "max_concurrent": 1})
    expected = f"1 image and {its_boxes + 2} boxes left out, 1 box clipped"

    assert main(["validate", str(space_file)]) == 0
    assert expected in capfd.readouterr().out
    status = main(["search", str(space_file), "--storage", str(tmp_path / "runs")])
    console = capfd.readouterr()
    assert status == 0, console.err[-2000:]

    assert file_digests(root) == before, "the user's dataset changed"
    cleaned = json.loads((tmp_path / "runs" / "skip" / "data" / "train.json").read_text())
    assert unreadable not in {i["file_name"] for i in cleaned["images"]}
    (clipped,) = [a for a in cleaned["annotations"] if a["id"] == int(outside.split()[1])]
    x, _, w, _ = clipped["bbox"]
    assert x + w == pytest.approx(next(i["width"] for i in cleaned["images"] if i["id"] == clipped["image_id"]))
    assert int(no_area.split()[1]) not in {a["id"] for a in cleaned["annotations"]}
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    parent = open_search(client, "skip").parent
    assert parent.data.tags[TAG_LEFT_OUT].startswith(expected)
    listed = json.loads(Path(client.download_artifacts(parent.info.run_id, LEFT_OUT_FILE, str(tmp_path))).read_text())
    assert {(i["item"], i["reason"]) for i in listed["left_out"]["images"]} == {(unreadable, "image unreadable")}
    assert any(b["item"] == nan and b["reason"] == "box not finite" for b in listed["left_out"]["boxes"])
    assert main(["report", "skip", "--out", str(tmp_path / "report"),
                 "--tracking-uri", f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"]) == 0
    report = "".join(p.read_text() for p in (tmp_path / "report").glob("*.md"))
    assert f"data (on_bad: skip): {expected}" in report
    original = json.loads((root / "train.json").read_text())
    assert f"| images | {len(original['images']) - 1} |" in report, "the card is of the data the trials read"
