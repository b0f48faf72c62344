"""requirements/lock.txt: every package dettune installs has one exact version there, within pyproject's ranges."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
LOCK = REPO / "requirements" / "lock.txt"


def _lock() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in LOCK.read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version and canonicalize_name(name) not in pins, f"one exact pin per package: {line!r}"
            pins[canonicalize_name(name)] = version
    return pins


def _pyproject_requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return [Requirement(dep) for dep in [*project["dependencies"], *project["optional-dependencies"]["dev"]]]


def test_every_pyproject_dependency_is_pinned_within_its_range() -> None:
    pins = _lock()
    for requirement in _pyproject_requirements():
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement.name} is in pyproject.toml but not locked: run scripts/lock.sh"
        assert requirement.specifier.contains(pins[name], prereleases=True), \
            f"the lock's {name}=={pins[name]} is outside pyproject's {requirement}: run scripts/lock.sh"


def _needs(requirement: Requirement) -> list[Requirement]:
    """What the installed distribution of ``requirement`` requires, with the extras it was asked for."""
    wanted = {"", *requirement.extras}
    return [needed for needed in map(Requirement, metadata.requires(requirement.name) or [])
            if needed.marker is None or any(needed.marker.evaluate({"extra": extra}) for extra in wanted)]


def test_everything_the_dependencies_pull_in_is_pinned() -> None:
    """The closure of pyproject's dependencies, as this venv's installed metadata declares it, lies in the lock."""
    pins = _lock()
    seen: set[tuple[str, frozenset[str]]] = set()
    pending = _pyproject_requirements()
    while pending:
        requirement = pending.pop()
        key = (canonicalize_name(requirement.name), frozenset(requirement.extras))
        if key in seen:
            continue
        seen.add(key)
        assert key[0] in pins, f"{requirement.name} (needed through pyproject's dependencies) is not locked"
        pending.extend(_needs(requirement))
    assert len({name for name, _ in seen}) > 100, "ray, mlflow and mmdet alone pull in over a hundred packages"


def test_torch_pin_is_the_one_install_sh_installs() -> None:
    script = (REPO / "scripts" / "install.sh").read_text()
    match = re.search(r"^TORCH_VERSION=(\S+)$", script, flags=re.MULTILINE)
    assert match is not None
    assert _lock()["torch"] == match.group(1)
    assert "mmcv" not in _lock(), "mmcv is built against torch by install.sh, never taken from the lock"
