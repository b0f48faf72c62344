"""The embedded default tracking store: a SQLite file beside a search's Ray storage, started from a copy.

MLflow builds a new SQLite store by running each of its schema migrations in turn, about 2 s on a small
machine, paid by every search that starts a new storage folder. The result is the same for every store of one
MLflow version, so it is built once per machine into the user's cache and copied (milliseconds).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from spaces.usercache import cache_dir


def ensure_store(db: Path) -> None:
    """Creates the SQLite store ``db`` as a copy of an empty one, unless it exists; safe against a racing driver."""
    if db.exists():
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    staged = _copy_beside(empty_store(), db)
    try:
        with contextlib.suppress(FileExistsError):  # another driver created it since the check: keep theirs
            os.link(staged, db)
    finally:
        staged.unlink()


def empty_store() -> Path:
    """An empty store at this MLflow version's schema, built on first use."""
    template = cache_dir() / f"mlflow-{mlflow.__version__}-empty.db"
    if not template.exists():
        template.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=template.parent) as tmp:
            built = Path(tmp) / "empty.db"
            MlflowClient(f"sqlite:///{built}").search_experiments(max_results=1)  # runs the migrations
            os.replace(built, template)  # atomic: racing builders leave one complete file
    return template


def _copy_beside(source: Path, target: Path) -> Path:
    """A copy of ``source`` under a temporary name in ``target``'s folder."""
    handle, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    os.close(handle)
    staged = Path(name)
    try:
        shutil.copyfile(source, staged)
    except BaseException:
        staged.unlink()
        raise
    return staged
