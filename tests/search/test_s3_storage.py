"""``--storage s3://BUCKET/PREFIX`` against a real S3-compatible server: moto's (tests/services.py ``s3_server``
says why moto), started on 127.0.0.1 by these tests and ended by its PID.

The slow test runs a real search (Ray in the driver, real mmdet trials) to the bucket, kills its driver, resumes it
from the bucket, then reports, exports and ensembles from it; the others check what is refused before anything is
written, and that the S3 endpoint variable reaches pyarrow.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow.fs
import pytest
from conftest import runs_of, write_space
from mlflow.tracking import MlflowClient
from services import S3Server, dettune_cli, free_port, kill_once_a_trial_ends, s3_server

from cocodata.dataset import Dataset
from search.entry import main
from search.trainable import FAILURE_FILE, SETUP_FAILED, SETUP_FAILURE_FILE, TrialPlan
from spaces.errors import USAGE_ERROR
from tracking_names import TAG_STATUS, TAG_STORAGE, TAG_TRIAL
from tracking_names.storage import Storage, open_storage
from trainers.checkpoint import CHECKPOINT_FILE, TRIAL_CONFIG
from trainers.hook import TrialDiverged

BUCKET = "dettune-test"


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with s3_server(tmp_path_factory.mktemp("s3")) as server:
        server.filesystem().create_dir(BUCKET)
        yield server


@pytest.fixture
def s3_env(s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """The standard AWS variables of the server, in this process and so in the commands it starts."""
    for name, value in s3.environment().items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return s3


def _objects(s3: S3Server, prefix: str) -> list[str]:
    selector = pyarrow.fs.FileSelector(f"{BUCKET}/{prefix}", recursive=True, allow_not_found=True)
    return [info.path for info in s3.filesystem().get_file_info(selector) if info.type == pyarrow.fs.FileType.File]


def _finished(*args: str, cwd: Path, timeout: float = 900) -> str:
    command = dettune_cli(*args, cwd=cwd)
    output, _ = command.communicate(timeout=timeout)
    assert command.returncode == 0, f"{args}: exit {command.returncode}\n{output[-3000:]}"
    return output


@pytest.mark.slow
def test_search_killed_and_resumed_in_s3_then_reported_exported_and_ensembled(tmp_path: Path, synth: Dataset,
                                                                    s3_env: S3Server) -> None:
    storage = f"s3://{BUCKET}/kill-resume"
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    space_file = write_space(tmp_path / "space.yaml", synth, name="s3-search",
                             budget={"epochs": 2, "trials": 3, "max_concurrent": 2},
                             scheduler={"type": "asha", "grace_epochs": 1, "reduction_factor": 2})
    kill_once_a_trial_ends(dettune_cli("search", str(space_file), "--storage", storage, "--tracking-uri", tracking_uri,
                                       cwd=tmp_path))

    _finished("resume", "s3-search", "--storage", storage, cwd=tmp_path)  # the tracking URI from the bucket

    runs = runs_of(tracking_uri, "s3-search")
    assert sorted(r.data.tags[TAG_TRIAL] for r in runs) == sorted({r.data.tags[TAG_TRIAL] for r in runs})
    assert len(runs) == 3, "trials were lost or duplicated"
    client = MlflowClient(tracking_uri)
    for run in runs:
        assert run.data.tags[TAG_STATUS] in ("completed", "stopped")
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val/bbox_mAP")]
        assert steps and steps == list(range(1, len(steps) + 1)), steps
    # Every trial's checkpoints are in the bucket, beside Tune's state and dettune's own files; nothing local.
    objects = _objects(s3_env, "kill-resume/s3-search")
    with_checkpoint = {path.split("/")[3] for path in objects if path.endswith(f"/{CHECKPOINT_FILE}")}
    assert len(with_checkpoint) == 3, objects
    assert any(path.endswith(f"/{TRIAL_CONFIG}") for path in objects)
    assert {"search.json", "space.json", "space.yaml"} <= {path.rsplit("/", 1)[1] for path in objects}
    assert not (tmp_path / "runs").exists(), "something was written to the local default storage"
    parent, = runs_of(tracking_uri, "s3-search", role="parent")
    assert parent.data.tags[TAG_STORAGE] == f"{storage}/s3-search"
    # No credential went into a file the search wrote (its checkpoints hold only weights and a config).
    filesystem = s3_env.filesystem()
    for path in objects:
        if not path.endswith(CHECKPOINT_FILE):
            with filesystem.open_input_stream(path) as stream:
                assert s3_env.secret.encode() not in stream.read(), path

    _finished("report", "s3-search", "--tracking-uri", tracking_uri, "--out", str(tmp_path / "report"), cwd=tmp_path)
    assert (tmp_path / "report" / "report.md").read_text().count("s3-search-") >= 3
    _finished("export", "s3-search", "--tracking-uri", tracking_uri, "--out", str(tmp_path / "model"), cwd=tmp_path)
    assert {path.name for path in (tmp_path / "model").iterdir()} >= {CHECKPOINT_FILE, TRIAL_CONFIG}
    assert (tmp_path / "model" / CHECKPOINT_FILE).stat().st_size > 1_000_000  # the weights, downloaded
    _finished("ensemble", "s3-search", "--top-k", "2", "--tracking-uri", tracking_uri, "--storage", storage,
              "--out", str(tmp_path / "ensemble"), cwd=tmp_path)
    cached = [path for path in _objects(s3_env, "kill-resume/s3-search/ensemble") if path.endswith(".bbox.json")]
    assert len(cached) == 2, cached  # each member's val predictions, cached in the bucket beside the trials


def _refused(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    assert main(list(args)) == USAGE_ERROR
    err = capsys.readouterr().err
    assert err.startswith("dettune: error: ") and "Traceback" not in err, err
    return err


def test_bad_storage_is_refused_before_anything_is_written(tmp_path: Path, synth: Dataset, s3_env: S3Server,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    space = str(write_space(tmp_path / "space.yaml", synth, name="refused"))
    tracking = ["--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]

    assert "not a folder or a URI pyarrow opens" in _refused(capsys, "search", space, "--storage", "nosuch://x/y",
                                                             *tracking)
    assert "remove them from the URI" in _refused(capsys, "search", space, "--storage",
                                                  f"s3://key:{s3_env.secret}@{BUCKET}/p", *tracking)
    assert "does not exist: create it" in _refused(capsys, "search", space, "--storage", "s3://no-such-bucket/p",
                                                   *tracking)
    err = _refused(capsys, "search", space, "--storage", f"s3://{BUCKET}/p")  # no tracking URI
    assert "pass --tracking-uri (or set MLFLOW_TRACKING_URI)" in err
    err = _refused(capsys, "resume", "absent", "--storage", f"s3://{BUCKET}/p")
    assert "no search named absent" in err and "--storage" in err
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    assert "cannot be reached" in _refused(capsys, "search", space, "--storage", f"s3://{BUCKET}/p", *tracking)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    err = _refused(capsys, "search", space, "--storage", f"s3://{BUCKET}/p", *tracking)
    assert "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in err

    assert _objects(s3_env, "p") == [], "a refused search wrote to the bucket"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["space.yaml"], "a refused search wrote locally"


def test_the_s3_endpoint_variable_reaches_pyarrow(s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """pyarrow 25 reads AWS_ENDPOINT_URL_S3 (as it reads AWS_ENDPOINT_URL) where dettune and Ray open a URI."""
    for name, value in s3.environment().items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3.endpoint)
    folder = open_storage(f"s3://{BUCKET}/variable/")
    (folder / "a" / "note.txt").write_text("written through the variable")

    assert folder.files() == {"a/note.txt"}
    assert Storage.of(f"s3://{BUCKET}/variable") / "a" / "note.txt" == folder / "a" / "note.txt"
    with s3.filesystem().open_input_stream(f"{BUCKET}/variable/a/note.txt") as stream:
        assert stream.read() == b"written through the variable"
    downloaded = (folder / "a").on_disk()
    assert (downloaded / "note.txt").read_text() == "written through the variable"


def test_a_failure_on_another_node_reaches_the_driver_through_the_bucket(s3_env: S3Server, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A trial's own files stay in its node's cache; the reason it failed is what the driver must still read."""
    plan = TrialPlan(space={}, base="b", data_root="d", storage=f"s3://{BUCKET}/reasons", name="s")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "trials-node"))
    for trial_id in ("diverged", "broken"):
        plan.failure_file(trial_id).parent.mkdir(parents=True)
    plan.record_failure("diverged", TrialDiverged("loss is nan at iteration 7"))
    plan.record_failure("diverged", RuntimeError("a later rank's reason"))  # the first reason stays
    plan.record_setup_failure("broken", "KeyError: 'roi_head'")

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "driver-node"))
    assert not plan.failure_file("diverged").exists()
    assert plan.failure_of("diverged") == "TrialDiverged: loss is nan at iteration 7"
    assert plan.failure_of("broken") == SETUP_FAILED + "KeyError: 'roi_head'"
    assert plan.failure_of("healthy") is None
    assert sorted(_objects(s3_env, "reasons")) == [f"{BUCKET}/reasons/s/trials/broken/{SETUP_FAILURE_FILE}",
                                                   f"{BUCKET}/reasons/s/trials/diverged/{FAILURE_FILE}"]
