"""The embedded default store starts as a copy of an empty one, built once per MLflow version."""

from __future__ import annotations

from pathlib import Path

from mlflow.tracking import MlflowClient

from search.local_store import empty_store, ensure_store


def test_a_new_store_is_a_working_copy_of_the_one_empty_store(tmp_path: Path) -> None:
    template = empty_store()
    built = template.stat()

    ensure_store(tmp_path / "a" / "mlflow.db")
    ensure_store(tmp_path / "b" / "mlflow.db")

    assert (template.stat().st_ino, template.stat().st_mtime_ns) == (built.st_ino, built.st_mtime_ns)
    for name in ("a", "b"):
        client = MlflowClient(f"sqlite:///{tmp_path / name / 'mlflow.db'}")
        assert [e.name for e in client.search_experiments()] == ["Default"]
        experiment = client.create_experiment(f"search-{name}")
        client.create_run(experiment)
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["mlflow.db", "mlflow.db"]


def test_an_existing_store_is_kept(tmp_path: Path) -> None:
    db = tmp_path / "mlflow.db"
    ensure_store(db)
    MlflowClient(f"sqlite:///{db}").create_experiment("kept")

    ensure_store(db)

    assert "kept" in [e.name for e in MlflowClient(f"sqlite:///{db}").search_experiments()]
