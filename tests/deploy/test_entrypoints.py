"""The compose services' entrypoint scripts, run for real with stand-in `ray` and `mlflow` executables.

The stand-ins record the command line and environment the scripts exec, so these tests check what each container
would start (token auth on, secrets kept off the command line, URIs quoted) in milliseconds. The live runs are in
test_cluster_auth.py.
"""

from __future__ import annotations

import configparser
import http.server
import json
import os
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest

DOCKER = Path(__file__).resolve().parents[2] / "docker"
ENTRYPOINTS = DOCKER / "entrypoints"
TOKEN = "0123456789abcdef" * 4
PG_PASSWORD = "p@ss:w/rd%25 #x-long-enough"  # every character that needs quoting in a URI or an ini file
ADMIN_PASSWORD = "admin-password-for-tests"
SECRET_KEY = "flask-secret-key-for-tests"

# Records argv, the environment and (for mlflow) the auth config file it was pointed at, then exits 0.
RECORDER = """#!{python}
import json, os, stat, sys
config = os.environ.get("MLFLOW_AUTH_CONFIG_PATH")
record = {{"argv": sys.argv[1:], "env": dict(os.environ)}}
if config:
    record["config_text"] = open(config).read()
    record["config_mode"] = stat.S_IMODE(os.stat(config).st_mode)
    record["config_dir_mode"] = stat.S_IMODE(os.stat(os.path.dirname(config)).st_mode)
with open(os.environ["RECORD_TO"], "w") as out:
    json.dump(record, out)
"""


@pytest.fixture
def stand_ins(tmp_path: Path) -> Path:
    """A bin directory whose `ray` and `mlflow` record how they were called."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("ray", "mlflow"):
        path = bin_dir / name
        path.write_text(RECORDER.format(python=sys.executable))
        path.chmod(0o755)
    return bin_dir


def run_entrypoint(script: str, stand_ins: Path, tmp_path: Path, env: dict[str, str],
                   *args: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any] | None]:
    """Runs docker/entrypoints/SCRIPT with only ``env`` (plus PATH to the stand-ins and python)."""
    record = tmp_path / "record.json"
    record.unlink(missing_ok=True)
    path = os.pathsep.join([str(stand_ins), str(Path(sys.executable).parent), "/usr/bin", "/bin"])
    done = subprocess.run([str(ENTRYPOINTS / script), *args], capture_output=True, text=True, timeout=60,
                          env={"PATH": path, "TMPDIR": str(tmp_path), "RECORD_TO": str(record), **env})
    return done, json.loads(record.read_text()) if record.exists() else None


def test_scripts_are_executable() -> None:
    for name in ("ray-head.sh", "ray-worker.sh", "mlflow.sh"):
        assert os.access(ENTRYPOINTS / name, os.X_OK), f"{name} must be executable (git keeps the mode)"
    assert os.access(DOCKER / "postgres" / "initdb.d" / "10-mlflow-auth-db.sh", os.X_OK)


# --- Ray ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("script", ["ray-head.sh", "ray-worker.sh"])
@pytest.mark.parametrize(("token", "complaint"), [
    (None, "RAY_AUTH_TOKEN is not set"),
    ("", "RAY_AUTH_TOKEN is not set"),
    ("change-me", "placeholder"),
    ("short-token", "too short"),
])
def test_ray_nodes_refuse_to_start_without_a_real_token(script: str, token: str | None, complaint: str,
                                                         stand_ins: Path, tmp_path: Path) -> None:
    env = {} if token is None else {"RAY_AUTH_TOKEN": token}
    done, record = run_entrypoint(script, stand_ins, tmp_path, env)
    assert done.returncode == 2
    assert complaint in done.stderr and "RAY_AUTH_TOKEN" in done.stderr
    assert record is None, "ray must not be started"


def test_ray_head_starts_with_token_auth(stand_ins: Path, tmp_path: Path) -> None:
    done, record = run_entrypoint("ray-head.sh", stand_ins, tmp_path, {"RAY_AUTH_TOKEN": TOKEN,
                                  "RAY_AUTH_TOKEN_PATH": "/elsewhere", "RAY_AUTH_MODE": "disabled"})
    assert done.returncode == 0, done.stderr
    assert record is not None
    argv, env = record["argv"], record["env"]
    assert argv[:3] == ["start", "--head", "--block"]
    assert _flag(argv, "--port") == "6379" and _flag(argv, "--dashboard-port") == "8265"
    assert _flag(argv, "--dashboard-host") == "0.0.0.0"  # inside the container; compose binds the host side
    assert _flag(argv, "--num-gpus") == "0"
    assert "--disable-usage-stats" in argv
    assert env["RAY_AUTH_MODE"] == "token", "token auth must be on whatever the environment said"
    assert env["RAY_AUTH_TOKEN"] == TOKEN and "RAY_AUTH_TOKEN_PATH" not in env
    assert not any(TOKEN in arg for arg in argv), "the token must stay off the command line"


def test_ray_head_settings_and_extra_arguments(stand_ins: Path, tmp_path: Path) -> None:
    env = {"RAY_AUTH_TOKEN": TOKEN, "RAY_NODE_IP": "127.0.0.1", "RAY_GCS_PORT": "7000",
           "RAY_DASHBOARD_HOST": "127.0.0.1", "RAY_DASHBOARD_PORT": "9000", "RAY_HEAD_NUM_CPUS": "2",
           "RAY_HEAD_NUM_GPUS": "1", "RAY_TEMP_DIR": "/tmp/x"}
    done, record = run_entrypoint("ray-head.sh", stand_ins, tmp_path, env, "--include-log-monitor", "false")
    assert done.returncode == 0, done.stderr
    assert record is not None
    argv = record["argv"]
    assert _flag(argv, "--node-ip-address") == "127.0.0.1" and _flag(argv, "--port") == "7000"
    assert _flag(argv, "--dashboard-host") == "127.0.0.1" and _flag(argv, "--dashboard-port") == "9000"
    assert _flag(argv, "--num-cpus") == "2" and _flag(argv, "--num-gpus") == "1"
    assert _flag(argv, "--temp-dir") == "/tmp/x"
    assert argv[-2:] == ["--include-log-monitor", "false"]


def test_ray_worker_joins_the_head_with_token_auth(stand_ins: Path, tmp_path: Path) -> None:
    done, record = run_entrypoint("ray-worker.sh", stand_ins, tmp_path, {"RAY_AUTH_TOKEN": TOKEN})
    assert done.returncode == 0, done.stderr
    assert record is not None
    argv, env = record["argv"], record["env"]
    assert argv[0] == "start" and "--head" not in argv and "--block" in argv
    assert _flag(argv, "--address") == "ray-head:6379"
    assert "--num-gpus" not in argv, "GPUs are detected from what compose reserved"
    assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN"] == TOKEN

    done, record = run_entrypoint("ray-worker.sh", stand_ins, tmp_path, {
        "RAY_AUTH_TOKEN": TOKEN, "RAY_HEAD_ADDRESS": "10.0.0.5:6379", "RAY_WORKER_NUM_CPUS": "8",
        "RAY_WORKER_NUM_GPUS": "0"})
    assert record is not None
    assert _flag(record["argv"], "--address") == "10.0.0.5:6379"
    assert _flag(record["argv"], "--num-cpus") == "8" and _flag(record["argv"], "--num-gpus") == "0"


# --- MLflow -------------------------------------------------------------------------------------------------------

def _mlflow_env(**changes: str | None) -> dict[str, str]:
    env: dict[str, str | None] = {
        "POSTGRES_HOST": "db.internal", "POSTGRES_PORT": "5433", "POSTGRES_USER": "ml flow",
        "POSTGRES_PASSWORD": PG_PASSWORD, "POSTGRES_DB": "mlflow", "MLFLOW_AUTH_DB": "mlflow_auth",
        "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PASSWORD, "MLFLOW_FLASK_SERVER_SECRET_KEY": SECRET_KEY,
        "MLFLOW_ARTIFACTS_DESTINATION": "s3://mlflow/artifacts"}
    env.update(changes)
    return {k: v for k, v in env.items() if v is not None}


@pytest.mark.parametrize(("changes", "complaint"), [
    ({"POSTGRES_PASSWORD": None}, "POSTGRES_PASSWORD is not set"),
    ({"POSTGRES_PASSWORD": "change-me"}, "POSTGRES_PASSWORD still holds the placeholder"),
    ({"MLFLOW_AUTH_ADMIN_PASSWORD": None}, "MLFLOW_AUTH_ADMIN_PASSWORD is not set"),
    ({"MLFLOW_AUTH_ADMIN_PASSWORD": "short"}, "MLFLOW_AUTH_ADMIN_PASSWORD is too short"),
    ({"MLFLOW_FLASK_SERVER_SECRET_KEY": "change-me-too"}, "MLFLOW_FLASK_SERVER_SECRET_KEY still holds"),
    ({"MLFLOW_ARTIFACTS_DESTINATION": None}, "MLFLOW_ARTIFACTS_DESTINATION is not set"),
])
def test_mlflow_refuses_to_start_misconfigured(changes: dict[str, str | None], complaint: str, stand_ins: Path,
                                               tmp_path: Path) -> None:
    done, record = run_entrypoint("mlflow.sh", stand_ins, tmp_path, _mlflow_env(**changes))
    assert done.returncode == 2
    assert complaint in done.stderr
    assert record is None


def test_mlflow_serves_basic_auth_on_postgres_with_secrets_off_the_command_line(stand_ins: Path,
                                                                                tmp_path: Path) -> None:
    done, record = run_entrypoint("mlflow.sh", stand_ins, tmp_path, _mlflow_env(), "--workers", "1")
    assert done.returncode == 0, done.stderr
    assert record is not None
    argv, env = record["argv"], record["env"]
    assert argv[:3] == ["server", "--app-name", "basic-auth"]
    assert "--serve-artifacts" in argv and _flag(argv, "--artifacts-destination") == "s3://mlflow/artifacts"
    assert _flag(argv, "--host") == "0.0.0.0" and _flag(argv, "--port") == "5000"
    assert argv[-2:] == ["--workers", "1"]
    for secret in (PG_PASSWORD, ADMIN_PASSWORD, SECRET_KEY):
        assert not any(secret in arg for arg in argv), "secrets must not reach the command line"
    assert env["MLFLOW_AUTH_ADMIN_USERNAME"] == "admin"
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"] == ADMIN_PASSWORD  # mlflow reads it itself
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"

    backend = urlsplit(env["MLFLOW_BACKEND_STORE_URI"])
    assert backend.scheme == "postgresql+psycopg"
    assert (unquote(backend.username or ""), unquote(backend.password or "")) == ("ml flow", PG_PASSWORD)
    assert (backend.hostname, backend.port, backend.path) == ("db.internal", 5433, "/mlflow")

    assert record["config_mode"] == 0o600 and record["config_dir_mode"] == 0o700
    config = configparser.ConfigParser()  # as mlflow reads it, interpolation included
    config.read_string(record["config_text"])
    auth = config["mlflow"]
    auth_db = urlsplit(auth["database_uri"])
    assert unquote(auth_db.password or "") == PG_PASSWORD and auth_db.path == "/mlflow_auth"
    assert auth["admin_username"] == "admin" and auth["default_permission"] == "READ"
    assert "admin_password" not in auth, "the admin password comes from the environment, not the file"


def test_mlflow_settings(stand_ins: Path, tmp_path: Path) -> None:
    env = _mlflow_env(MLFLOW_HOST="127.0.0.1", MLFLOW_PORT="5055", MLFLOW_WORKERS="3",
                      MLFLOW_AUTH_ADMIN_USERNAME="root", MLFLOW_AUTH_DEFAULT_PERMISSION="NO_PERMISSIONS",
                      MLFLOW_SERVER_ENABLE_JOB_EXECUTION="true")
    done, record = run_entrypoint("mlflow.sh", stand_ins, tmp_path, env)
    assert done.returncode == 0, done.stderr
    assert record is not None
    argv = record["argv"]
    assert (_flag(argv, "--host"), _flag(argv, "--port"), _flag(argv, "--workers")) == ("127.0.0.1", "5055", "3")
    assert record["env"]["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "true"
    config = configparser.ConfigParser()
    config.read_string(record["config_text"])
    assert config["mlflow"]["admin_username"] == "root"
    assert config["mlflow"]["default_permission"] == "NO_PERMISSIONS"


# --- health check -------------------------------------------------------------------------------------------------

class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.send_response(200 if self.path == "/health" else 500)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's signature)
        pass


@pytest.fixture
def local_server() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_healthcheck(local_server: str) -> None:
    def check(*urls: str) -> int:
        return subprocess.run([sys.executable, str(ENTRYPOINTS / "healthcheck.py"), *urls],
                              capture_output=True, timeout=30).returncode

    assert check(f"{local_server}/health") == 0
    assert check(f"{local_server}/health", f"{local_server}/broken") == 1
    assert check("http://127.0.0.1:9/health") == 1  # nothing listens on the discard port
    assert check() == 2


def _flag(argv: list[str], name: str) -> str | None:
    """The value after ``name`` in ``argv`` (the last one if repeated)."""
    values = [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == name]
    return values[-1] if values else None


def test_common_sh_is_sourced_not_run() -> None:
    mode = (ENTRYPOINTS / "common.sh").stat().st_mode
    assert not mode & stat.S_IXUSR
