"""Starts the mmcv source build with the session when its test is selected, and runs that test last."""

from __future__ import annotations

import pytest
from installing import SourceBuild

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
