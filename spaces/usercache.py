"""The user's cache folder for what dettune keeps per machine, never inside a dataset or a checkout."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/dettune``, else ``~/.cache/dettune``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dettune"
