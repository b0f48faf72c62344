"""`dettune submit` to a real `ray start --head` with token authentication: checked here, run there."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import runs_of, write_space
from services import RayHead, ray_head

from cocodata.dataset import Dataset
from search.submit import SUBMITTED, stage_upload
from spaces.errors import DETTUNE_PACKAGES

REPO = Path(__file__).resolve().parents[2]


def _submit(head: RayHead, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """`dettune submit`, again while the fresh head's job agent is still starting (its refusal is exit 2)."""
    deadline = time.monotonic() + 120
    while True:
        done = subprocess.run([sys.executable, "-m", "search", "submit", *args, "--address", head.dashboard],
                              env=head.env, capture_output=True, text=True, timeout=timeout)
        if "No available agent" not in done.stderr or time.monotonic() > deadline:
            return done
        time.sleep(3)


def _job_info(head: RayHead, job: str) -> dict[str, Any]:
    """What Ray's job API shows of the job (to anyone who may list jobs), asked with the cluster's token."""
    show = ("import json, sys; from ray.job_submission import JobSubmissionClient; "
            f"info = JobSubmissionClient({head.dashboard!r}).get_job_info({job!r}); "
            "print(json.dumps({'entrypoint': info.entrypoint, 'env': info.runtime_env.get('env_vars', {})}))")
    done = subprocess.run([sys.executable, "-c", show], env=head.env, capture_output=True, text=True, timeout=120,
                          check=True)
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def _job_id(output: str) -> str:
    (line,) = [line for line in output.splitlines() if line.startswith("submitted job ")]
    return line.split()[2]


def test_the_upload_holds_the_packages_and_the_space_files_only(tmp_path: Path) -> None:
    space = tmp_path / "mine.yaml"
    space.write_text("name: x\n")

    files = stage_upload(tmp_path / "upload", [space, space])

    assert sorted(p.name for p in (tmp_path / "upload").iterdir()) == sorted([*DETTUNE_PACKAGES, SUBMITTED])
    assert files == [f"{SUBMITTED}/01-mine.yaml", f"{SUBMITTED}/02-mine.yaml"]
    assert not list((tmp_path / "upload").rglob("__pycache__"))
    uploaded = {p.relative_to(tmp_path / "upload" / "search") for p in (tmp_path / "upload" / "search").rglob("*.py")}
    assert uploaded == {p.relative_to(REPO / "search") for p in (REPO / "search").rglob("*.py")}


def test_a_bad_space_is_refused_before_the_cluster_is_asked(tmp_path: Path) -> None:
    space = tmp_path / "bad.yaml"
    space.write_text("name: bad\nspace: {lr: {loguniform: [0.1, 0.01]}}\n")
    done = subprocess.run([sys.executable, "-m", "search", "submit", str(space), "--address", "http://127.0.0.1:9"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "bad.yaml" in done.stderr and "lr" in done.stderr, done.stderr


@pytest.mark.slow
def test_a_submitted_search_runs_on_the_cluster_with_credentials_kept_out_of_its_command(
        tmp_path: Path, synth: Dataset, no_local_ray: None) -> None:
    space = write_space(tmp_path / "space.yaml", synth, name="submitted")
    storage = tmp_path / "storage"
    with ray_head() as head:
        secret = "pw-" + os.urandom(6).hex()
        refused = _submit(head, str(space), "--tracking-uri", f"http://dettune:{secret}@127.0.0.1:9",
                          "--storage", str(storage))
        assert refused.returncode == 0, refused.stderr
        job = _job_id(refused.stdout)
        info = _job_info(head, job)
        assert secret not in info["entrypoint"] and "127.0.0.1:9" in info["entrypoint"]
        assert info["env"]["MLFLOW_TRACKING_PASSWORD"] == secret
        stopped = _submit(head, "--stop", job)
        assert stopped.returncode == 0, stopped.stderr

        done = _submit(head, str(space), "--storage", str(storage), "--epochs", "1", "--follow")
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "SUCCEEDED" in done.stdout
    trials = runs_of(f"sqlite:///{storage / 'mlflow.db'}", "submitted")
    assert len(trials) == 2 and all(r.data.tags["dettune.status"] == "completed" for r in trials)
