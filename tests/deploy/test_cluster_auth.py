"""The compose services' own entrypoints, run live on 127.0.0.1: authentication on, a search submitted as a job.

- PostgreSQL 15 from Debian's packages: a throw-away cluster under a temp dir (as the `postgres` user when the
  tests run as root: postgres refuses to run as root), set up with docker/postgres/initdb.d like the image does;
- docker/entrypoints/mlflow.sh: MLflow's basic-auth app, runs and users in that PostgreSQL, artifacts served;
- docker/entrypoints/ray-head.sh: a Ray head with token authentication.

Every server listens on 127.0.0.1 only (Ray is kept off the machine's other addresses with
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, which makes it use the loopback address). The services are stopped the way
`docker compose stop` stops them (SIGTERM through tini), not with `ray stop`, which would end every Ray process on
the machine, other tests' clusters included.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import services
from services import BIN, Postgres, free_port, kill_until_gone, tail, wait_for_http

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
ENTRYPOINTS = REPO / "docker" / "entrypoints"
# Passwords with characters that must be quoted in URIs and escaped in mlflow's ini file.
PG_PASSWORD = "pg:p@ss/w%rd#" + secrets.token_hex(8)
ADMIN_PASSWORD = "admin-" + secrets.token_hex(12)
SEARCH = "deploy-demo"


def http_status(url: str, *, auth: tuple[str, str] | None = None, token: str | None = None,
                body: dict[str, Any] | None = None) -> tuple[int, Any]:
    """(status, parsed JSON body or text) of a GET, or a POST when ``body`` is given."""
    headers = {"Content-Type": "application/json"}
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(":".join(auth).encode()).decode()
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, headers=headers, method="POST" if body is not None else "GET",
                                     data=json.dumps(body).encode() if body is not None else None)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        status, text = error.code, error.read().decode(errors="replace")
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def start_entrypoint(script: str, env: dict[str, str], log: Path, *args: str) -> subprocess.Popen[bytes]:
    """Runs docker/entrypoints/SCRIPT as its container would, leading a process group of its own."""
    with log.open("wb") as out:
        return subprocess.Popen([str(ENTRYPOINTS / script), *args], env=env, stdout=out, stderr=subprocess.STDOUT,
                                cwd=log.parent, start_new_session=True)


def stop_group(process: subprocess.Popen[bytes], marker: str, *, group: bool, grace: float = 45) -> None:
    """Stops an entrypoint as its container's tini would, SIGKILL to its process group after ``grace`` seconds.

    ``group``: SIGTERM to the whole process group (tini -g, the MLflow image) or to the entrypoint's process only
    (the Ray images: `ray start --block` drains the node, then stops every Ray process it started). Processes
    left over afterwards are found by ``marker``, this test's private temp dir on their command line, and killed
    by pid.
    """
    with contextlib.suppress(ProcessLookupError, subprocess.TimeoutExpired):
        if group:
            os.killpg(process.pid, signal.SIGTERM)
        else:
            process.terminate()
        process.wait(timeout=grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    kill_until_gone(lambda: _pids_with(marker), every_s=0.5)


def _pids_with(marker: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker.encode() in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


# --- PostgreSQL ---------------------------------------------------------------------------------------------------

AUTH_DATABASE = "mlflow_auth"


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    with services.postgres(user="mlflow", password=PG_PASSWORD, database="mlflow") as pg:
        # what the image does for POSTGRES_DB, then the init script compose mounts into
        # /docker-entrypoint-initdb.d, twice: it must be idempotent
        init_env = {**os.environ, "PGHOST": "127.0.0.1", "PGPORT": str(pg.port), "PGPASSWORD": pg.password,
                    "POSTGRES_USER": pg.user, "POSTGRES_DB": pg.database, "MLFLOW_AUTH_DB": AUTH_DATABASE}
        init_script = REPO / "docker" / "postgres" / "initdb.d" / "10-mlflow-auth-db.sh"
        for _ in range(2):
            subprocess.run([str(init_script)], env=init_env, check=True, capture_output=True, timeout=60)
        yield pg


def test_init_script_made_the_auth_database(postgres: Postgres) -> None:
    databases = {row[0] for row in postgres.psql("postgres", "SELECT datname FROM pg_database")}
    assert {postgres.database, AUTH_DATABASE} <= databases
    owner = postgres.psql("postgres", f"SELECT pg_get_userbyid(datdba) FROM pg_database "
                                      f"WHERE datname = '{AUTH_DATABASE}'")
    assert owner == [[postgres.user]]


# --- MLflow -------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Mlflow:
    url: str
    artifacts: Path
    admin: tuple[str, str]


@pytest.fixture(scope="module")
def mlflow(postgres: Postgres) -> Iterator[Mlflow]:
    root = Path(tempfile.mkdtemp(prefix="dettune-mlflow-"))
    port = free_port()
    env = {"PATH": f"{BIN}{os.pathsep}/usr/bin{os.pathsep}/bin", "HOME": str(root), "TMPDIR": str(root),
           "POSTGRES_HOST": "127.0.0.1", "POSTGRES_PORT": str(postgres.port), "POSTGRES_USER": postgres.user,
           "POSTGRES_PASSWORD": postgres.password, "POSTGRES_DB": postgres.database,
           "MLFLOW_AUTH_DB": AUTH_DATABASE, "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PASSWORD,
           "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(24),
           "MLFLOW_ARTIFACTS_DESTINATION": (root / "artifacts").as_uri(),
           "MLFLOW_HOST": "127.0.0.1", "MLFLOW_PORT": str(port), "MLFLOW_WORKERS": "1"}
    log = root / "mlflow.log"
    process = start_entrypoint("mlflow.sh", env, log)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_http(f"{url}/health", 180, healthy=True, process=process, log=log)
        yield Mlflow(url=url, artifacts=root / "artifacts", admin=("admin", ADMIN_PASSWORD))
    finally:
        stop_group(process, str(root), group=True)
        shutil.rmtree(root, ignore_errors=True)


def test_mlflow_refuses_unauthenticated_calls(mlflow: Mlflow) -> None:
    search = f"{mlflow.url}/api/2.0/mlflow/experiments/search?max_results=10"
    create = f"{mlflow.url}/api/2.0/mlflow/experiments/create"
    assert http_status(search)[0] == 401
    assert http_status(search, auth=("admin", "not-the-password"))[0] == 401
    assert http_status(search, auth=("nobody", ADMIN_PASSWORD))[0] == 401
    assert http_status(create, body={"name": "intruder"})[0] == 401
    status, body = http_status(search, auth=mlflow.admin)
    assert status == 200 and "intruder" not in json.dumps(body)
    assert http_status(f"{mlflow.url}/health")[0] == 200  # the health check needs no credentials


# --- Ray ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RayHead:
    dashboard: str
    token: str
    root: Path

    def client_env(self, **extra: str) -> dict[str, str]:
        """A `ray` CLI environment with nothing from this machine's Ray set-up (HOME is private)."""
        env = {"PATH": f"{BIN}{os.pathsep}/usr/bin{os.pathsep}/bin", "HOME": str(self.root / "client-home"),
               "LANG": "C.UTF-8"}
        return {**env, **extra}

    def job_cli(self, *args: str, token: str | None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        env = self.client_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token) if token else self.client_env()
        return subprocess.run([str(BIN / "ray"), "job", *args], env=env, capture_output=True, text=True,
                              timeout=timeout, cwd=self.root)


@pytest.fixture(scope="module")
def ray_head() -> Iterator[RayHead]:
    root = Path(tempfile.mkdtemp(prefix="dtray-", dir="/tmp"))  # Ray's socket paths must stay under 107 bytes
    (root / "client-home").mkdir()
    token = secrets.token_hex(32)
    dashboard_port = free_port()
    env = {"PATH": f"{BIN}{os.pathsep}/usr/bin{os.pathsep}/bin", "HOME": str(root), "LANG": "C.UTF-8",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # keep every Ray server on 127.0.0.1
           "RAY_AUTH_TOKEN": token, "RAY_NODE_IP": "127.0.0.1", "RAY_GCS_PORT": str(free_port()),
           "RAY_DASHBOARD_HOST": "127.0.0.1", "RAY_DASHBOARD_PORT": str(dashboard_port),
           "RAY_HEAD_NUM_CPUS": "2", "RAY_TEMP_DIR": str(root / "t")}
    log = root / "ray-head.log"
    process = start_entrypoint("ray-head.sh", env, log, "--dashboard-agent-listen-port", str(free_port()),
                               "--ray-client-server-port", str(free_port()))
    try:
        head = RayHead(dashboard=f"http://127.0.0.1:{dashboard_port}", token=token, root=root)
        wait_for_http(f"{head.dashboard}/api/gcs_healthz", 180, healthy=True, process=process, log=log)
        deadline = time.monotonic() + 60
        while http_status(f"{head.dashboard}/api/jobs/", token=token)[0] != 200:  # the job API comes up last
            assert time.monotonic() < deadline, tail(log)
            time.sleep(1)
        yield head
    finally:
        stop_group(process, str(root), group=False)
        shutil.rmtree(root, ignore_errors=True)


def test_ray_job_api_refuses_requests_without_the_token(ray_head: RayHead) -> None:
    jobs = f"{ray_head.dashboard}/api/jobs/"
    assert http_status(jobs)[0] == 401
    assert http_status(jobs, token=secrets.token_hex(32))[0] == 403
    assert http_status(jobs, body={"entrypoint": "echo sneaked-in"})[0] == 401
    assert http_status(f"{ray_head.dashboard}/api/gcs_healthz")[0] == 200  # health stays open for compose

    refused = ray_head.job_cli("submit", "--address", ray_head.dashboard, "--", "echo", "sneaked-in", token=None)
    assert refused.returncode != 0
    assert "authentication" in (refused.stdout + refused.stderr).lower()
    wrong = ray_head.job_cli("submit", "--address", ray_head.dashboard, "--", "echo", "sneaked-in",
                             token=secrets.token_hex(32))
    assert wrong.returncode != 0

    status, listed = http_status(jobs, token=ray_head.token)
    assert status == 200
    assert "sneaked-in" not in json.dumps(listed), "a refused submission must not have created a job"


@pytest.mark.timeout(600)
def test_search_job_with_the_token_logs_to_mlflow_on_postgres(ray_head: RayHead, mlflow: Mlflow,
                                                              postgres: Postgres) -> None:
    # The searches get an MLflow account of their own, made the way the README says (signed in as the admin).
    user = ("dettune", "search-" + secrets.token_hex(12))
    make_user = ("from mlflow.server import get_app_client\n"
                 f"auth = get_app_client('basic-auth', tracking_uri='{mlflow.url}')\n"
                 f"auth.create_user('{user[0]}', '{user[1]}')")
    subprocess.run([sys.executable, "-c", make_user], check=True, capture_output=True, timeout=120,
                   env={**os.environ, "MLFLOW_TRACKING_USERNAME": mlflow.admin[0],
                        "MLFLOW_TRACKING_PASSWORD": mlflow.admin[1]})

    storage = ray_head.root / "storage"
    runtime_env = {"env_vars": {"MLFLOW_TRACKING_USERNAME": user[0], "MLFLOW_TRACKING_PASSWORD": user[1]}}
    entrypoint = ("python -m search data synth data/synth --images 16 && "
                  f"python -m search search spaces/demo.yaml --trials 2 --epochs 2 --name {SEARCH} "
                  f"--tracking-uri {mlflow.url} --storage {storage}")
    job = ray_head.job_cli("submit", "--address", ray_head.dashboard, "--working-dir", str(REPO),
                           "--runtime-env-json", json.dumps(runtime_env), "--", "bash", "-c", entrypoint,
                           token=ray_head.token, timeout=540)
    output = job.stdout + job.stderr
    assert job.returncode == 0, output[-6000:]
    assert "succeeded" in output
    assert user[1] not in output, "the MLflow password must not be logged"

    # Through MLflow's API, with credentials: the search's parent run and one run per trial, with metrics.
    status, found = http_status(f"{mlflow.url}/api/2.0/mlflow/experiments/get-by-name?experiment_name={SEARCH}",
                                auth=mlflow.admin)
    assert status == 200, found
    experiment_id = found["experiment"]["experiment_id"]
    status, listed = http_status(f"{mlflow.url}/api/2.0/mlflow/runs/search", auth=mlflow.admin,
                                 body={"experiment_ids": [experiment_id], "max_results": 100})
    assert status == 200, listed
    runs = listed["runs"]
    roles = sorted(tag["value"] for run in runs for tag in run["data"]["tags"] if tag["key"] == "dettune.role")
    assert roles == ["parent", "trial", "trial"]
    for run in runs:
        if {"key": "dettune.role", "value": "trial"} in run["data"]["tags"]:
            assert {"val/bbox_mAP", "train/loss"} <= {m["key"] for m in run["data"]["metrics"]}
    assert user[1] not in json.dumps(listed), "the MLflow password must not be logged"

    # The runs landed in PostgreSQL, and the artifacts went through the server to its artifact store.
    rows = postgres.psql(postgres.database, f"""
        SELECT count(DISTINCT r.run_uuid), count(m.key)
        FROM runs r JOIN experiments e ON e.experiment_id = r.experiment_id
        LEFT JOIN metrics m ON m.run_uuid = r.run_uuid AND m.key = 'val/bbox_mAP'
        WHERE e.name = '{SEARCH}'""")
    assert int(rows[0][0]) == 3 and int(rows[0][1]) >= 2
    leaked = postgres.psql(postgres.database, f"""
        SELECT (SELECT count(*) FROM params WHERE value LIKE '%{user[1]}%')
             + (SELECT count(*) FROM tags WHERE value LIKE '%{user[1]}%')""")
    assert leaked == [["0"]]
    users = postgres.psql(AUTH_DATABASE, "SELECT username, is_admin FROM users ORDER BY username")
    assert users == [["admin", "t"], ["dettune", "f"]]
    assert list(mlflow.artifacts.rglob("space.yaml")), "the parent run's space.yaml should be in the artifact store"
