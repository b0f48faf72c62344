"""The study copy in a PostgreSQL database, as a team's cluster keeps it beside its tracking server's."""

from __future__ import annotations

import subprocess
import sys
import urllib.parse
from pathlib import Path

import optuna
import pytest
from conftest import runs_of, write_space
from services import postgres

from cocodata.dataset import Dataset
from tracking_names import TAG_TRIAL


@pytest.mark.slow
def test_a_search_copies_its_study_to_postgresql_without_writing_the_password(tmp_path: Path,
                                                                             synth: Dataset) -> None:
    space = write_space(tmp_path / "space.yaml", synth, name="pg-study", budget={"epochs": 1, "trials": 2})
    storage = tmp_path / "runs"
    with postgres(user="optuna", database="studies") as pg:
        secret = urllib.parse.quote(pg.password, safe="")
        url = f"postgresql+psycopg://{pg.user}:{secret}@127.0.0.1:{pg.port}/{pg.database}"
        done = subprocess.run([sys.executable, "-m", "search", "search", str(space), "--storage", str(storage),
                               "--study-storage", url], cwd=tmp_path, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert pg.password not in done.stdout + done.stderr

        study = optuna.load_study(study_name="pg-study", storage=url)
        copied = sorted(t.user_attrs["dettune.trial"] for t in study.trials)
    trials = runs_of(f"sqlite:///{storage / 'mlflow.db'}", "pg-study")
    assert copied == sorted(r.data.tags[TAG_TRIAL] for r in trials) and len(copied) == 2
    assert not (storage / "optuna.db").exists(), "the default SQLite copy was written as well"
    written = [p for p in storage.rglob("*") if p.is_file() and pg.password.encode() in p.read_bytes()]
    assert not written, f"the database password was written to {written}"
