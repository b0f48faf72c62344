"""The oldest torch dettune runs on, checked before anything imports torch.

Older torch lacks APIs the trials use (``torch.OutOfMemoryError`` and ``torch.serialization.safe_globals``
are both new in torch 2.5), and would fail only deep inside a trial with an AttributeError. The installed
version is read from the package metadata, so the check costs no torch import and works even when torch
itself does not import.
"""

from __future__ import annotations

from importlib import metadata

from packaging.version import InvalidVersion, Version

TORCH_FLOOR = "2.5"
"""Keep in step with the ``torch>=`` requirement in pyproject.toml (a test checks that)."""


def installed_torch() -> str | None:
    """The installed torch's version string, or None when torch is not installed."""
    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return None


def torch_problem(installed: str | None) -> str | None:
    """Why ``installed`` (a torch version, None when absent) can't run dettune, or None when it can.

    Pre-releases and local builds of the floor release count as that release (``2.5.0a0+git`` has its APIs).
    """
    if installed is None:
        return f"torch is not installed; dettune needs torch >= {TORCH_FLOOR}: run `make install`"
    try:
        release = Version(installed).release
    except InvalidVersion:
        return None  # a custom build we can't order: let it try
    if release < Version(TORCH_FLOOR).release:
        return (f"torch {installed} is installed but dettune needs torch >= {TORCH_FLOOR} "
                f"(torch.OutOfMemoryError, torch.serialization.safe_globals): upgrade it, e.g. `make install`")
    return None
