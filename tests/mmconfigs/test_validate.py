"""``dettune validate``: each rule it checks beyond the schema, all problems at once, and the command."""

from __future__ import annotations

import argparse
import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from cocodata.synth import write_dataset
from mmconfigs import build as build_module
from mmconfigs import validate as validate_module
from mmconfigs.validate import check_file, summary
from search.validate_cmd import add_parser
from spaces.errors import Problem, SpaceError
from trainers.smoke import first_step

FASTER_BASE = "mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic dataset, written once; tests that break it work on a copy."""
    root = tmp_path_factory.mktemp("pristine")
    write_dataset(root, images=8, size=160, seed=0)
    return root


@pytest.fixture
def data_root(pristine: Path, tmp_path: Path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(pristine, root)
    return root


def space_data(root: Path, **changes: Any) -> dict[str, Any]:
    """A valid tiny space on the dataset at ``root``, with top-level fields replaced by ``changes``."""
    data: dict[str, Any] = {
        "name": "tiny",
        "base": FASTER_BASE,
        "data": {"root": str(root), "train": "train.json", "val": "val.json"},
        "budget": {"epochs": 2, "trials": 2},
        "scheduler": {"type": "none"},
        "space": {"roi_head": {"choice": ["faster", "cascade"]}, "lr": {"loguniform": [0.001, 0.01]}},
        "fixed": {"backbone": "r18", "preset": "tiny", "scale": [160, 160]},
    }
    data.update(changes)
    return data


def write_space(tmp_path: Path, data: dict[str, Any]) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def problems_of(tmp_path: Path, data: dict[str, Any]) -> list[Problem]:
    with pytest.raises(SpaceError) as caught:
        check_file(write_space(tmp_path, data), first_step=first_step)
    return caught.value.problems


def only_problem(tmp_path: Path, data: dict[str, Any]) -> Problem:
    problems = problems_of(tmp_path, data)
    assert len(problems) == 1, problems
    return problems[0]


def edit_json(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


def test_valid_space_passes_and_counts_each_distinct_model_once(data_root: Path, tmp_path: Path) -> None:
    space = {"roi_head": {"choice": ["faster", "cascade"]}, "schedule": {"choice": ["step", "cosine"]},
             "lr": {"loguniform": [0.001, 0.01]}}
    validation = check_file(write_space(tmp_path, space_data(data_root, space=space)), first_step=first_step)

    assert validation.combinations == 4
    assert validation.models == 2  # the schedule doesn't change the model
    assert validation.dataset.classes[0] == "General trash"


def test_the_training_step_is_seeded_quiet_and_leaves_the_callers_random_state(
        data_root: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    space_file = write_space(tmp_path, space_data(data_root))
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)

    assert check_file(space_file, first_step=first_step).trained == 2  # two roi heads: two (model, pipeline)s
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    printed = capfd.readouterr()
    assert "init_weights" not in printed.out + printed.err  # mmengine logs each parameter's init otherwise


def test_missing_base_config(data_root: Path, tmp_path: Path) -> None:
    problem = only_problem(tmp_path, space_data(data_root, base="mmdet::nope/nope_1x_coco.py"))

    assert (problem.field, problem.value) == ("base", "mmdet::nope/nope_1x_coco.py")
    assert "not found" in problem.rule


def test_broken_base_config(data_root: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.py"
    broken.write_text("model = dict(type=\n")

    problem = only_problem(tmp_path, space_data(data_root, base=str(broken)))

    assert problem.field == "base"
    assert "mmengine can't load this config" in problem.rule


def test_missing_dataset_root(tmp_path: Path) -> None:
    problem = only_problem(tmp_path, space_data(tmp_path / "nowhere"))

    assert problem.field == "data.root"
    assert problem.value == str(tmp_path / "nowhere")
    assert "does not exist" in problem.rule


def test_missing_annotation_file(data_root: Path, tmp_path: Path) -> None:
    (data_root / "val.json").unlink()

    problem = only_problem(tmp_path, space_data(data_root))

    assert (problem.field, problem.value) == ("data.val", "val.json")
    assert "does not exist" in problem.rule


def test_corrupt_annotation_json(data_root: Path, tmp_path: Path) -> None:
    (data_root / "train.json").write_text('{"images": [')

    problem = only_problem(tmp_path, space_data(data_root))

    assert (problem.field, problem.value) == ("data.train", "train.json")
    assert "not valid JSON" in problem.rule


def test_annotation_file_that_is_not_coco(data_root: Path, tmp_path: Path) -> None:
    (data_root / "val.json").write_text('{"info": {}}')

    problem = only_problem(tmp_path, space_data(data_root))

    assert problem.field == "data.val"
    assert "not a COCO annotation file" in problem.rule


def test_missing_images(data_root: Path, tmp_path: Path) -> None:
    first = json.loads((data_root / "train.json").read_text())["images"][0]["file_name"]
    (data_root / "images" / first).unlink()

    missing, fix = problems_of(tmp_path, space_data(data_root))

    assert (missing.field, missing.value) == ("data.train", "train.json")
    assert "image missing (1;" in missing.rule and first in missing.rule
    assert fix.field == "data" and f"dettune data check {data_root}" in fix.rule


def test_no_categories(data_root: Path, tmp_path: Path) -> None:
    for name in ("train.json", "val.json"):
        edit_json(data_root / name, lambda doc: doc.update(categories=[]))

    problem = only_problem(tmp_path, space_data(data_root))

    assert problem.field == "data.train"
    assert "lists no categories" in problem.rule


def test_unknown_category_ids(data_root: Path, tmp_path: Path) -> None:
    edit_json(data_root / "train.json", lambda doc: doc["annotations"][0].update(category_id=99))

    problem, fix = problems_of(tmp_path, space_data(data_root))

    assert problem.field == "data.train"
    assert "annotation of an unlisted category (1;" in problem.rule and "(category_id 99)" in problem.rule
    assert fix.field == "data" and "dettune data check" in fix.rule


def test_zero_annotations(data_root: Path, tmp_path: Path) -> None:
    edit_json(data_root / "val.json", lambda doc: doc.update(annotations=[]))

    problem = only_problem(tmp_path, space_data(data_root))

    assert problem.field == "data.val"
    assert "zero annotations" in problem.rule


def drop_masks(doc: dict[str, Any]) -> None:
    for annotation in doc["annotations"]:
        annotation.pop("segmentation")


def test_htc_needs_masks(data_root: Path, tmp_path: Path) -> None:
    edit_json(data_root / "train.json", drop_masks)
    space = {"roi_head": {"choice": ["faster", "htc"]}}

    problem = only_problem(tmp_path, space_data(data_root, space=space))

    assert (problem.field, problem.value) == ("space.roi_head", "htc")
    assert "without 'segmentation'" in problem.rule


def test_mask_base_config_needs_masks(data_root: Path, tmp_path: Path) -> None:
    edit_json(data_root / "train.json", drop_masks)
    base = "mmdet::htc/htc-without-semantic_r50_fpn_1x_coco.py"

    problem = only_problem(tmp_path, space_data(data_root, base=base, space={"lr": {"loguniform": [0.001, 0.01]}}))

    assert (problem.field, problem.value) == ("base", base)
    assert "mask branch" in problem.rule


@pytest.mark.parametrize(("metric", "word", "drop"), [
    ("val/bbox_mAP_s", "small", lambda area: area < 32**2),
    ("val/bbox_mAP_l", "large", lambda area: area >= 96**2),
])
def test_area_metric_needs_val_objects_of_its_range(
    data_root: Path, tmp_path: Path, metric: str, word: str, drop: Callable[[float], bool]
) -> None:
    def keep_others(doc: dict[str, Any]) -> None:
        doc["annotations"] = [a for a in doc["annotations"] if not drop(a["area"])]

    edit_json(data_root / "val.json", keep_others)

    problem = only_problem(tmp_path, space_data(data_root, metric=metric))

    assert (problem.field, problem.value) == ("metric", metric)
    assert f"no {word} objects" in problem.rule and "-1" in problem.rule


def test_objective_or_limit_on_an_area_metric_no_trial_reports(data_root: Path, tmp_path: Path) -> None:
    edit_json(data_root / "val.json",
              lambda doc: doc.update(annotations=[a for a in doc["annotations"] if a["area"] >= 32**2]))
    data = space_data(data_root, objectives=[{"metric": "val/bbox_mAP_s", "mode": "max"}],
                      constraints={"val/bbox_mAP_s": {"min": 0.1}})

    problems = problems_of(tmp_path, data)

    assert [(p.field, p.value) for p in problems] == [("objectives.0.metric", "val/bbox_mAP_s"),
                                                      ("constraints.val/bbox_mAP_s", "val/bbox_mAP_s")]
    assert all("no small objects" in p.rule and "no trial reports val/bbox_mAP_s" in p.rule for p in problems)


def test_summary_of_a_constrained_multi_objective_search(data_root: Path, tmp_path: Path) -> None:
    data = space_data(data_root, objectives=[{"metric": "inference/fps", "mode": "max"}],
                      constraints={"model/params_M": {"max": 60}}, search={"algorithm": "nsga2"},
                      scheduler={"type": "asha", "grace_epochs": 1})

    text = summary(check_file(write_space(tmp_path, data), first_step=first_step))

    assert "objectives inference/fps (max)" in text
    assert "limits     model/params_M <= 60: a trial outside it is never the best" in text
    assert "search     Optuna NSGA-II towards val/bbox_mAP and inference/fps, within the limits, seed 0" in text
    assert "by val/bbox_mAP, the primary metric" in text


def test_knob_combination_that_cannot_build(data_root: Path, tmp_path: Path) -> None:
    overrides = {"model.roi_head.bbox_head.0.loss_cls.loss_weight": 2.0}  # cascade's list of three heads
    data = space_data(data_root, space={"roi_head": {"choice": ["cascade", "faster"]}}, overrides=overrides)

    problem = only_problem(tmp_path, data)

    assert (problem.field, problem.value) == ("overrides.model.roi_head.bbox_head.0.loss_cls.loss_weight", 2.0)
    assert "'0' does not exist" in problem.rule and "(with roi_head=faster)" in problem.rule


def test_knob_values_the_base_config_cannot_take(data_root: Path, tmp_path: Path) -> None:
    data = space_data(data_root, base="mmdet::retinanet/retinanet_r50_fpn_1x_coco.py")

    problems = problems_of(tmp_path, data)

    assert [(p.field, p.value) for p in problems] == [("space.roi_head", "faster"), ("space.roi_head", "cascade")]
    assert all("two-stage base config" in p.rule for p in problems)


def test_a_failing_step_is_blamed_on_the_knob_it_is_registered_for(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(build_module, "STEPS", dict(build_module.STEPS))

    @build_module.step("lr_check_with_an_unrelated_name", knob="lr")
    def fail(cfg: Any, build: build_module.Build) -> None:
        raise build_module.BuildError("lr needs an optim_wrapper in the base config")

    problems = problems_of(tmp_path, space_data(data_root))

    assert {p.field for p in problems} == {"space.lr"}
    assert all("lr needs an optim_wrapper in the base config" in p.rule for p in problems)


def test_a_step_that_fails_in_every_combination_is_blamed_on_no_knob(data_root: Path, tmp_path: Path) -> None:
    # Four anchor strides for the FPN's five levels: the model builds, its first forward fails, whatever the head.
    data = space_data(data_root, overrides={"model.rpn_head.anchor_generator.strides": [4, 8, 16, 32]})

    problem = only_problem(tmp_path, data)  # faster and cascade fail alike: one problem

    assert (problem.field, problem.value) == ("base", FASTER_BASE)
    assert "fails at the forward + loss (model): AssertionError" in problem.rule
    assert "so no knob explains it" in problem.rule and "roi_head=" not in problem.rule


def test_model_that_mmdet_cannot_construct(data_root: Path, tmp_path: Path) -> None:
    data = space_data(data_root, space={"backbone": {"choice": ["r18", "swin-t"]}}, fixed={"preset": "tiny"},
                      overrides={"model.backbone.depth": 19})

    problems = problems_of(tmp_path, data)

    assert [(p.field, p.value) for p in problems] == [("space.backbone", "r18"), ("overrides.model.backbone.depth", 19)]
    assert "mmdet can't build this model (KeyError: 'invalid depth 19 for resnet')" in problems[0].rule
    assert "(with backbone=swin-t)" in problems[1].rule


def test_model_whose_imports_fail_is_blamed_on_the_backbone(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(imports: list[str], allow_failed_imports: bool = False) -> None:
        raise ImportError(f"Failed to import {imports[0]}") from ModuleNotFoundError("No module named 'torchvision'")

    monkeypatch.setattr(validate_module, "import_modules_from_strings", fail)
    data = space_data(data_root, space={"backbone": {"choice": ["r18", "convnext-t"]}}, fixed={"preset": "tiny"})

    problem = only_problem(tmp_path, data)

    assert (problem.field, problem.value) == ("space.backbone", "convnext-t")
    assert "mmpretrain.models" in problem.rule and "No module named 'torchvision'" in problem.rule


def test_missing_pretrained_checkpoint(data_root: Path, tmp_path: Path) -> None:
    problem = only_problem(tmp_path, space_data(data_root, pretrained={"r18": str(tmp_path / "r18.pth")}))

    assert problem.field == "pretrained.r18"
    assert "not found" in problem.rule


def test_override_of_a_missing_key(data_root: Path, tmp_path: Path) -> None:
    overrides = {"model.rpn_head.anchor_generator.scale": [4]}

    problem = only_problem(tmp_path, space_data(data_root, overrides=overrides))

    assert (problem.field, problem.value) == ("overrides.model.rpn_head.anchor_generator.scale", [4])
    assert "did you mean 'scales'" in problem.rule


def test_every_problem_of_every_stage_at_once(tmp_path: Path) -> None:
    data = space_data(tmp_path / "nowhere", base="mmdet::nope/nope_1x_coco.py", metric="val/mAP")

    problems = problems_of(tmp_path, data)

    assert {p.field for p in problems} == {"metric", "base", "data.root"}
    assert all(p.file == str(tmp_path / "space.yaml") for p in problems)


def test_problems_of_valid_schema_stages_together(data_root: Path, tmp_path: Path) -> None:
    (data_root / "val.json").write_text("[]")
    data = space_data(data_root, base="mmdet::retinanet/retinanet_r50_fpn_1x_coco.py",
                      pretrained={"r50": str(tmp_path / "r50.pth")})

    problems = problems_of(tmp_path, data)

    assert [p.field for p in problems] == ["pretrained.r50", "data.val", "space.roi_head", "space.roi_head"]


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="dettune")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code: int = args.handler(args)
    return code


def test_command_lists_problems_and_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_space(tmp_path, space_data(tmp_path / "nowhere", base="mmdet::nope/nope_1x_coco.py"))

    code = run_cli(["validate", str(path)])

    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    assert f"{path} has 2 problems" in err
    assert f"{path}: base = 'mmdet::nope/nope_1x_coco.py': base config" in err
    assert f"{path}: data.root = " in err
    assert "Traceback" not in err


def test_command_prints_summary_of_valid_space(
    data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_space(tmp_path, space_data(data_root))

    code = run_cli(["validate", str(path)])

    out, _ = capsys.readouterr()
    assert code == 0
    assert out.splitlines()[0] == f"{path}: valid space 'tiny'"
    for expected in ("roi_head  choice (2): faster, cascade", "lr        loguniform: 0.001 .. 0.01",
                     "grid       none: lr is continuous", "trials     2, up to 2 epochs each",
                     "search     Optuna TPE, seed 0", "scheduler  none",
                     "models     2 model variants built on the meta device from 2 knob combinations"):
        assert expected in out
    # The dataset card adds a head line, 6 rows of counts and one row per class.
    classes = len(json.loads((data_root / "train.json").read_text())["categories"])
    assert len(out.splitlines()) <= 24 + 7 + classes


def test_summary_of_a_grid(data_root: Path, tmp_path: Path) -> None:
    data = space_data(data_root, search={"algorithm": "grid"}, budget={"epochs": 2, "trials": 9},
                      space={"roi_head": {"grid": ["faster", "cascade"]}, "scale": {"grid": [[128, 128], [160, 160]]}},
                      fixed={"backbone": "r18", "preset": "tiny"})

    text = summary(check_file(write_space(tmp_path, data), first_step=first_step))

    assert "grid       4 points" in text
    assert "trials     4, one per grid point" in text
    assert "budget.trials (9) is unused" in text
    assert "2 model variants built on the meta device from 4 knob combinations" in text
