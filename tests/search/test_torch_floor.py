"""The torch floor: pyproject states it, and every ``dettune`` command under an older torch stops at once."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement

from search.torch_floor import TORCH_FLOOR, torch_problem

REPO = Path(__file__).resolve().parents[2]


def test_pyproject_states_the_floor() -> None:
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (torch_requirement,) = [Requirement(d) for d in dependencies if Requirement(d).name == "torch"]
    assert str(torch_requirement.specifier) == f">={TORCH_FLOOR}"


def test_installed_torch_has_the_apis_the_floor_stands_for() -> None:
    assert issubclass(torch.OutOfMemoryError, RuntimeError)
    assert callable(torch.serialization.safe_globals)


@pytest.mark.parametrize("version", ["2.5.0", "2.5.1", "2.13.0+cpu", "2.5.0a0+git1234567", "3.0"])
def test_floor_release_and_newer_pass(version: str) -> None:
    assert torch_problem(version) is None


@pytest.mark.parametrize("version", ["2.4.1", "2.1.2+cu121", "1.13.1"])
def test_older_torch_names_installed_and_required(version: str) -> None:
    problem = torch_problem(version)
    assert problem is not None
    assert f"torch {version} is installed" in problem and ">= 2.5" in problem


def test_missing_torch_says_how_to_install() -> None:
    problem = torch_problem(None)
    assert problem is not None and "not installed" in problem and "make install" in problem


def _old_torch_on_path(tmp_path: Path, version: str) -> dict[str, str]:
    """An environment whose first torch distribution on sys.path reports ``version``."""
    info = tmp_path / f"torch-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n")
    return {"PYTHONPATH": str(tmp_path), "PATH": str(Path(sys.executable).parent)}


@pytest.mark.parametrize("command", [[str(Path(sys.executable).parent / "dettune")], [sys.executable, "-m", "search"]])
def test_every_command_under_old_torch_stops_with_one_line(tmp_path: Path, command: list[str]) -> None:
    env = _old_torch_on_path(tmp_path, "2.1.2")
    for args in (["validate", "space.yaml"], ["report", "demo"], ["data", "synth", "out"]):
        done = subprocess.run([*command, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, done.stderr
        assert done.stderr.splitlines() == [
            "dettune: error: torch 2.1.2 is installed but dettune needs torch >= 2.5 (torch.OutOfMemoryError, "
            "torch.serialization.safe_globals): upgrade it, e.g. `make install`"]
        assert done.stdout == ""
    assert not (tmp_path / "out").exists(), "nothing is written"


def test_the_check_runs_before_anything_imports_torch(tmp_path: Path) -> None:
    code = ("import sys\nfrom search.entry import main\nstatus = main(['validate', 'space.yaml'])\n"
            "print(status, 'torch' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_old_torch_on_path(tmp_path, "2.4.1"),
                          capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["2", "False"], done.stderr
