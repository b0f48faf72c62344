"""Print dettune's runtime requirements from pyproject.toml, one per line, for the image builds.

The images install torch (and mmcv, which must match torch's C++ ABI) themselves: the GPU image PyPI's torch 2.13.0
(the CUDA 13.0 build) and an mmcv compiled for it, the CPU image torch's CPU build and an mmcv built against it. So the
build installs everything else from here, and then dettune itself with ``--no-deps``: one list of pins, in
pyproject.toml, for the venv and the images alike.

    python docker/requirements.py [--pyproject PATH] [--exclude NAME ...]
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

DEFAULT_PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def distribution_name(requirement: str) -> str:
    """The normalized project name of a PEP 508 requirement (``ray[tune]==2.60.*`` -> ``ray``)."""
    match = _NAME.match(requirement)
    if match is None:
        raise ValueError(f"not a requirement: {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def requirements(pyproject: Path, exclude: set[str]) -> list[str]:
    """The ``[project] dependencies`` of ``pyproject`` whose names are not in ``exclude``."""
    dependencies = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    excluded = {distribution_name(name) for name in exclude}
    return [dep for dep in dependencies if distribution_name(dep) not in excluded]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pyproject", type=Path, default=DEFAULT_PYPROJECT)
    parser.add_argument("--exclude", action="append", default=[], metavar="NAME",
                        help="leave this distribution out (repeatable)")
    args = parser.parse_args(argv)
    print("\n".join(requirements(args.pyproject, set(args.exclude))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
