"""Contract over every ready space in ``spaces/``: it validates, and every knob combination builds a model."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from cocodata.synth import write_dataset
from mmconfigs.validate import check_file, check_space
from spaces.distributions import Choice, Grid
from spaces.errors import SpaceError
from spaces.schema import Space, load_space
from trainers.smoke import first_step

SPACES_DIR = Path(__file__).resolve().parents[2] / "spaces"
READY = sorted(SPACES_DIR.glob("*.yaml"))
LOG_EXPERIMENTS = ("backbone-vs-map", "scale-vs-small", "freeze-vs-map")
REAL_DATA = {"root": "data/trash", "train": "train.json", "val": "val.json"}


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Stands in for the real data: the trash task's 10 classes, with masks and objects of every area range."""
    root = tmp_path_factory.mktemp("ready")
    write_dataset(root, images=8, size=160, seed=0)
    return root


def on_synthetic_data(path: Path, root: Path) -> Space:
    data: dict[str, Any] = yaml.safe_load(path.read_text())
    data["data"] = {"root": str(root), "train": "train.json", "val": "val.json"}
    return Space.from_json(data, str(path))


def test_the_logs_experiments_are_ready() -> None:
    assert {path.stem for path in READY} >= {*LOG_EXPERIMENTS, "demo"}


@pytest.mark.parametrize("path", READY, ids=lambda path: path.stem)
def test_ready_space_validates_and_every_combination_builds(path: Path, synthetic_root: Path) -> None:
    space = on_synthetic_data(path, synthetic_root)

    validation = check_space(space, str(path), first_step=first_step)

    categorical = [dist for dist in space.space.values() if isinstance(dist, Choice | Grid)]
    assert validation.combinations == math.prod(len(dist.values) for dist in categorical)
    assert 1 <= validation.models <= validation.combinations


@pytest.mark.parametrize("path", READY, ids=lambda path: path.stem)
def test_ready_space_is_named_after_its_file_and_explains_itself(path: Path) -> None:
    space = load_space(path)

    assert space.name == path.stem
    assert space.hypothesis and space.method
    assert space.hypothesis.isascii() and space.method.isascii()


@pytest.mark.parametrize("name", LOG_EXPERIMENTS)
def test_log_experiment_targets_the_real_setting(name: str) -> None:
    space = load_space(SPACES_DIR / f"{name}.yaml")

    # the real export, refused if anything in it is broken (the default: the user decides to skip)
    assert space.data.model_dump() == {**REAL_DATA, "images": "images", "on_bad": "refuse"}
    assert space.base == "mmdet::cascade_rcnn/cascade-rcnn_r50_fpn_1x_coco.py"
    assert (space.budget.epochs, space.budget.gpus_per_trial) == (12, 1)
    assert space.budget.max_concurrent > 1
    assert space.scheduler.type == "asha"


@pytest.mark.parametrize("name", LOG_EXPERIMENTS)
def test_missing_real_data_is_reported_clearly(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # where data/trash does not exist

    with pytest.raises(SpaceError) as caught:
        check_file(SPACES_DIR / f"{name}.yaml", first_step=first_step)

    [problem] = caught.value.problems
    assert (problem.field, problem.value) == ("data.root", "data/trash")
    assert "data/trash does not exist" in problem.rule
