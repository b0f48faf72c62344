"""Shared fixtures: synthetic datasets written once per session, the tiny trial preset, and the mmcv source build
started with the session when its test is selected (it then runs last: tests/installing.py says why)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from installing import SourceBuild
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from cocodata.dataset import Dataset, open_dataset
from cocodata.synth import write_dataset

CASCADE_BASE = "mmdet::cascade_rcnn/cascade-rcnn_r50_fpn_1x_coco.py"
FASTER_BASE = "mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py"
SOURCE_BUILD_TEST = "test_fresh_machine_builds_mmcv_then_reuses_the_cached_wheel"
BUILD = pytest.StashKey[SourceBuild]()


@pytest.hookimpl(trylast=True)  # after `-m`/`-k` have deselected what they deselect
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    selected = [item for item in items if item.name == SOURCE_BUILD_TEST]
    for item in selected:
        items.remove(item)
    items.extend(selected)
    if selected and not config.option.collectonly:
        config.stash[BUILD] = SourceBuild.start()


def pytest_unconfigure(config: pytest.Config) -> None:
    build = config.stash.get(BUILD, None)
    if build is not None:
        build.remove()


@pytest.fixture
def source_build(request: pytest.FixtureRequest) -> SourceBuild:
    """The build started with the session: its venv, cache and wheelhouse, and its outcome once it ends."""
    return request.config.stash[BUILD]


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """What the product caches per machine (the empty MLflow store) goes to this session's folder, not ~/.cache."""
    cache = tmp_path_factory.mktemp("cache")
    before = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(cache)
    yield cache
    if before is None:
        del os.environ["XDG_CACHE_HOME"]
    else:
        os.environ["XDG_CACHE_HOME"] = before


def tiny_point(**changes: Any) -> dict[str, Any]:
    """A point that trains in seconds on the CPU: tiny preset, ResNet-18, 160 px."""
    point = dict(backbone="r18", preset="tiny", scale=[160, 160], optimizer="sgd", lr=0.02,
                 schedule="step", epochs=2, batch_size=4)
    point.update(changes)
    return point


def make_dataset(tmp_path_factory: pytest.TempPathFactory, images: int) -> Dataset:
    """A synthetic dataset of ``images`` 160 px images (a quarter of them for validation), with masks."""
    root = tmp_path_factory.mktemp(f"synth{images}")
    write_dataset(root, images=images, size=160, seed=0)
    return open_dataset(root, "train.json", "val.json")


@pytest.fixture(scope="session")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    """48 images, 36 for training: enough for a couple of quick epochs."""
    return make_dataset(tmp_path_factory, 48)


@pytest.fixture(scope="session")
def synth_large(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    """96 images: enough for mAP to rise clearly within a few epochs."""
    return make_dataset(tmp_path_factory, 96)


@pytest.fixture
def work_dir(tmp_path: Path) -> Path:
    return tmp_path / "trial"


@pytest.fixture(scope="module")
def ray_local() -> None:
    """Ray in this process, started by the first module that needs it and kept for the next ones.

    4 logical CPUs on the 2-CPU machines, so that 4 one-CPU trials can run at once (they just run slower).
    """
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)


@pytest.fixture
def no_local_ray() -> None:
    """Stops this process's Ray (a test's or a search's), for tests that start a cluster of their own:
    two Ray instances on one machine compete for the same default agent ports."""
    import ray

    ray.shutdown()


def write_space(path: Path, dataset: Dataset, **sections: Any) -> Path:
    """Writes a space YAML over ``dataset`` with tiny defaults; ``sections`` replace top-level fields."""
    doc: dict[str, Any] = {
        "name": "t",
        "base": FASTER_BASE,
        "data": {"root": str(dataset.root), "train": dataset.train, "val": dataset.val},
        "metric": "val/bbox_mAP_50",
        "budget": {"epochs": 2, "trials": 2, "max_concurrent": 2},
        "search": {"algorithm": "tpe", "seed": 0},
        "scheduler": {"type": "none"},
        "space": {"lr": {"loguniform": [0.005, 0.03]}},
        "fixed": {"backbone": "r18", "preset": "tiny", "scale": [160, 160], "optimizer": "sgd", "batch_size": 4},
    }
    doc.update(sections)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def runs_of(tracking_uri: str, name: str, role: str = "trial") -> list[Run]:
    """The runs of search ``name`` with this ``dettune.role`` (trial or parent), read straight from MLflow."""
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(name)
    assert experiment is not None, f"no experiment {name} in {tracking_uri}"
    return list(client.search_runs([experiment.experiment_id], f"tags.`dettune.role` = '{role}'"))


def file_digests(root: Path) -> dict[str, str]:
    """Each file under ``root`` (relative path) -> its SHA-256: to show a dataset left byte for byte as it was."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}
