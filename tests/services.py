"""Real services on 127.0.0.1 for tests and benchmarks: a Ray head and worker nodes started with `ray start`,
a throw-away PostgreSQL, an `mlflow server`, and a proxy that loses a reply."""

from __future__ import annotations

import http.client
import http.server
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Collection, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports: each socket is held until all are bound (one at a time, the OS may hand
    the same just-released port out twice)."""
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in socks]


# A server that starts in seconds on an idle machine took 95 s at load 37: waiting longer costs nothing when it is
# up sooner, and a serving process that exits still fails the wait at once.
def wait_for_http(url: str, timeout: float = 240.0, *, healthy: bool = False,
                  process: subprocess.Popen[bytes] | None = None, log: Path | None = None) -> None:
    """Waits until ``url`` answers: at all (an HTTP error such as 401 counts: the server is up), or with
    ``healthy`` with a success. A ``process`` serving it that exits meanwhile fails at once, with its log's tail."""
    deadline = time.monotonic() + timeout
    while True:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{process.args} exited with {process.returncode}:\n{tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except urllib.error.HTTPError:
            if not healthy:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer{' healthy' if healthy else ''} within {timeout:.0f} s:\n"
                               f"{tail(log)}")
        time.sleep(0.5)


def tail(log: Path | None, chars: int = 4000) -> str:
    """The end of a service's log, for a failure message."""
    return log.read_text(errors="replace")[-chars:] if log is not None and log.exists() else "(no log)"


def agent_ports(*, besides: Collection[int] = ()) -> list[str]:
    """Free ports for a node's agents, none of ``besides`` (ports chosen for the node but not bound yet, which
    the OS may hand out again): the defaults (52365, ...) may be held by another Ray on this machine, and a node
    whose job agent can't bind answers every submission with "No available agent"."""
    flags = ["--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--metrics-export-port",
             "--runtime-env-agent-port", "--ray-client-server-port"]
    ports = free_ports(len(flags))
    while set(ports) & set(besides):
        ports = free_ports(len(flags))
    return [f"{flag}={port}" for flag, port in zip(flags, ports, strict=True)]


@dataclass(frozen=True)
class RayHead:
    dashboard: str
    gcs_address: str
    env: dict[str, str]
    """The client environment: token authentication on, with this cluster's token."""


@contextmanager
def ray_head(*, num_cpus: int = 2, object_store_mb: int | None = None) -> Iterator[RayHead]:
    """`ray start --head` on 127.0.0.1 with token authentication; afterwards its processes, and those of the
    worker nodes joined to it (:func:`start_worker_node`), are killed by its temp dir."""
    # PATH first lists this venv, so job entrypoints find `dettune` and `python` as on a cluster image.
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    gcs, dash = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay under 107 bytes
    subprocess.run([str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
                    f"--num-cpus={num_cpus}", "--num-gpus=0", "--include-dashboard=true",
                    "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--disable-usage-stats",
                    f"--temp-dir={temp_dir}", *_object_store(object_store_mb), *agent_ports()],
                   check=True, env=env, capture_output=True, text=True)
    try:
        dashboard = f"http://127.0.0.1:{dash}"
        wait_for_http(f"{dashboard}/api/version")
        yield RayHead(dashboard, f"127.0.0.1:{gcs}", env)
    finally:
        _kill_processes_using(temp_dir)  # not `ray stop`: it would stop every Ray on the machine
        shutil.rmtree(temp_dir, ignore_errors=True)


def _object_store(megabytes: int | None) -> list[str]:
    return [] if megabytes is None else [f"--object-store-memory={megabytes * 1024**2}"]


def start_worker_node(head: RayHead, *, node_manager_port: int, num_cpus: int = 1, num_gpus: int = 0,
                      object_store_mb: int | None = None) -> None:
    """`ray start --address` joining ``head``; GPUs are logical (a resource count), so no device is needed.

    The node's processes are found by its ``node_manager_port`` (:func:`node_processes`); they share the
    head's temp dir, so the head's clean-up ends them too.
    """
    subprocess.run([str(BIN / "ray"), "start", f"--address={head.gcs_address}", "--node-ip-address=127.0.0.1",
                    f"--num-cpus={num_cpus}", f"--num-gpus={num_gpus}", f"--node-manager-port={node_manager_port}",
                    "--disable-usage-stats", *_object_store(object_store_mb),
                    *agent_ports(besides=[node_manager_port])],
                   check=True, env=head.env, capture_output=True, text=True)


def node_processes(node_manager_port: int) -> list[int]:
    """A worker node's raylet (started with this --node-manager-port) and every process it started."""
    raylets = [int(p.parent.name) for p in Path("/proc").glob("[0-9]*/cmdline")
               if proc_bytes(p).startswith(b"/") and b"raylet" in proc_bytes(p).split(b"\0")[0]
               and f"--node_manager_port={node_manager_port}".encode() in proc_bytes(p)]
    return raylets + [pid for raylet in raylets for pid in descendants(raylet)]


def submit_job(head: RayHead, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """`ray job submit` to ``head``, retried while the node's job agent is still starting (a fresh head
    answers "No available agent to submit job" for a while, longer on a loaded machine)."""
    deadline = time.monotonic() + 120
    while True:
        done = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", head.dashboard, *args],
                              env=head.env, capture_output=True, text=True, timeout=timeout)
        if "No available agent" not in done.stdout + done.stderr or time.monotonic() > deadline:
            return done
        time.sleep(3)


def _kill_processes_using(marker: str) -> None:
    """SIGKILLs every process whose command line mentions ``marker`` (this head's own temp dir)."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if marker.encode() in cmdline.read_bytes():
                os.kill(int(cmdline.parent.name), signal.SIGKILL)
        except (OSError, ValueError):  # gone meanwhile
            continue


def kill_until_gone(pids_of_ours: Callable[[], list[int]], *, timeout_s: float = 10.0, every_s: float = 0.2) -> None:
    """SIGKILLs what ``pids_of_ours`` lists (processes the caller started, found by its own marker) until it lists
    none, or ``timeout_s``: a process may start another while its parent dies."""
    deadline = time.monotonic() + timeout_s
    while (pids := pids_of_ours()) and time.monotonic() < deadline:
        for pid in pids:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(every_s)


def proc_bytes(path: str | Path) -> bytes:
    """A /proc file's bytes; empty when its process ended meanwhile."""
    try:
        return Path(path).read_bytes()
    except OSError:
        return b""


def descendants(root: int) -> list[int]:
    """The pids of every process below ``root`` (children, their children, ...), from /proc."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        fields = proc_bytes(stat).rsplit(b")", 1)[-1].split()  # after "(comm)", which may hold spaces
        if len(fields) > 1:
            parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [root]
    while frontier:
        children = [pid for pid, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


@contextmanager
def mlflow_server(tmp: Path, port: int | None = None, *, backend_uri: str | None = None) -> Iterator[str]:
    """`mlflow server` on 127.0.0.1 with served artifacts in ``tmp`` and a store at ``backend_uri`` (by default
    SQLite in ``tmp``); yields its URL.

    Starting it again with the same ``tmp`` (or ``backend_uri``) and ``port`` brings the same store back.
    """
    port = port or free_port()
    log = open(tmp / "mlflow-server.log", "a")  # noqa: SIM115 - closed below, after the server
    server = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", backend_uri or f"sqlite:///{tmp / 'mlflow-server.db'}",
         "--artifacts-destination", str(tmp / "mlflow-artifacts")],
        stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_http(f"{url}/health")
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


class FaultyProxy:
    """An HTTP proxy on 127.0.0.1 in front of ``upstream`` that makes the network's faults happen when a test says:
    once armed for a path, it forwards the next request, lets the server answer (the write is committed) and then
    closes the connection without the reply (a dropped reply, or a client timeout just after the commit); while
    cut, it closes every connection before forwarding anything (the server is gone, at once and for certain,
    unlike a server process that takes its time to stop). With ``reply_delay_s`` every reply comes that much
    later: a distant or busy server."""

    def __init__(self, upstream: str, *, reply_delay_s: float = 0.0) -> None:
        self.upstream = urllib.parse.urlsplit(upstream).netloc
        self.reply_delay_s = reply_delay_s
        self.armed_for: str | None = None
        self.dropped: list[str] = []
        self.is_cut = False
        proxy = self

        class Forward(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as MLflow's client uses it

            def forward(self) -> None:
                if proxy.is_cut:
                    self.close_connection = True  # the client's request goes nowhere and it hears nothing
                    return
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                upstream = http.client.HTTPConnection(proxy.upstream, timeout=60)
                try:
                    upstream.request(self.command, self.path, body=body,
                                     headers={k: v for k, v in self.headers.items() if k.lower() != "connection"})
                    reply = upstream.getresponse()
                    content = reply.read()
                finally:
                    upstream.close()
                time.sleep(proxy.reply_delay_s)
                if proxy.armed_for is not None and self.path.endswith(proxy.armed_for):
                    proxy.armed_for = None
                    proxy.dropped.append(self.path)
                    self.close_connection = True  # the server answered; the client hears nothing
                    return
                self.send_response(reply.status)
                for key, value in reply.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length", "date", "server"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = forward

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Forward)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def drop_next_reply(self, path_end: str) -> None:
        """The next request whose path ends with ``path_end`` reaches the server; its reply never comes back."""
        self.armed_for = path_end

    def cut(self) -> None:
        """From now on no request reaches the server, until ``restore``."""
        self.is_cut = True

    def restore(self) -> None:
        self.is_cut = False

    def __enter__(self) -> FaultyProxy:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


@dataclass(frozen=True)
class Postgres:
    port: int
    user: str
    password: str
    database: str

    @property
    def uri(self) -> str:
        """The SQLAlchemy URI of its database, as `mlflow server --backend-store-uri` takes it."""
        return (f"postgresql+psycopg://{self.user}:{urllib.parse.quote(self.password, safe='')}"
                f"@127.0.0.1:{self.port}/{self.database}")

    def psql(self, database: str, sql: str) -> list[list[str]]:
        env = {**os.environ, "PGPASSWORD": self.password}
        done = subprocess.run([pg_bin("psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user,
                               "-d", database, "-v", "ON_ERROR_STOP=1", "-AtF", "\t", "-c", sql],
                              env=env, capture_output=True, text=True, timeout=60, check=True)
        return [line.split("\t") for line in done.stdout.splitlines()]


def pg_bin(name: str) -> str:
    """A PostgreSQL program: on PATH, or in Debian's /usr/lib/postgresql/<major>/bin."""
    found = shutil.which(name)
    if found:
        return found
    for candidate in sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True):
        return str(candidate)
    raise FileNotFoundError(f"PostgreSQL's {name} is missing: apt-get install -y postgresql")


@contextmanager
def postgres(*, user: str = "mlflow", password: str | None = None, database: str = "mlflow") -> Iterator[Postgres]:
    """A throw-away PostgreSQL cluster in a temp dir on 127.0.0.1 (password auth), holding ``database``.

    Run as the ``postgres`` user when we are root: postgres refuses to run as root.
    """
    initdb, pg_ctl = pg_bin("initdb"), pg_bin("pg_ctl")
    run_as: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="dettune-pg-"))
    if os.geteuid() == 0:
        owner = pwd.getpwnam("postgres")
        run_as = ["runuser", "-u", "postgres", "--"]
        os.chown(root, owner.pw_uid, owner.pw_gid)
    root.chmod(0o700)
    pg = Postgres(port=free_port(), user=user, password=password or secrets.token_hex(12), database=database)
    password_file = root / "pwfile"
    password_file.write_text(pg.password + "\n")
    if run_as:
        os.chown(password_file, owner.pw_uid, owner.pw_gid)
    data, log = root / "data", root / "server.log"
    subprocess.run([*run_as, initdb, "-D", str(data), "-U", pg.user, f"--pwfile={password_file}",
                    "--auth=scram-sha-256", "-E", "UTF8", "--no-sync"], check=True, capture_output=True, timeout=120)
    password_file.unlink()
    server_options = f"-p {pg.port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run([*run_as, pg_ctl, "-D", str(data), "-l", str(log), "-o", server_options, "-w", "-t", "60",
                    "start"], check=True, capture_output=True, timeout=120)
    try:
        pg.psql("postgres", f"CREATE DATABASE {pg.database}")
        yield pg
    finally:
        subprocess.run([*run_as, pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop"], capture_output=True,
                       timeout=120)
        shutil.rmtree(root, ignore_errors=True)


@dataclass(frozen=True)
class S3Server:
    """An S3-compatible server on 127.0.0.1 and the standard variables that point a client at it."""

    endpoint: str
    secret: str

    def environment(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": "dettune-test", "AWS_SECRET_ACCESS_KEY": self.secret,
                "AWS_ENDPOINT_URL": self.endpoint, "AWS_DEFAULT_REGION": "us-east-1"}

    def filesystem(self) -> Any:
        """A pyarrow client of its own (not through dettune), allowed to create buckets."""
        import pyarrow.fs

        return pyarrow.fs.S3FileSystem(access_key="dettune-test", secret_key=self.secret, region="us-east-1",
                                       endpoint_override=self.endpoint, allow_bucket_creation=True)


@contextmanager
def s3_server(tmp: Path) -> Iterator[S3Server]:
    """moto's S3 server (``moto_server``, from PyPI's moto) on a free port of 127.0.0.1, its state in memory.

    moto rather than MinIO: it installs with pip into the venv (no binary or Debian package to fetch), starts in
    about a second, speaks the S3 API pyarrow and Ray use (multipart uploads, listings, deletes), and keeps
    nothing on disk, so a test leaves nothing behind. It accepts any credentials.
    """
    port = free_port()
    log_path = tmp / "moto-server.log"
    log = open(log_path, "a")  # noqa: SIM115 - closed below, after the server
    server = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        endpoint = f"http://127.0.0.1:{port}"
        wait_for_http(f"{endpoint}/moto-api/", process=server, log=log_path)
        yield S3Server(endpoint=endpoint, secret=secrets.token_hex(16))
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def dettune_cli(*args: str, cwd: Path) -> subprocess.Popen[str]:
    """``dettune ARGS`` (``python -m search``) of this checkout, in a session of its own, its output merged and
    read as text. The checkout goes first on the path: from another ``cwd``, the venv's editable install could be
    another checkout's (a git worktree's tests would run the main checkout's code)."""
    path = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")]))
    return subprocess.Popen([sys.executable, "-m", "search", *args], cwd=cwd, text=True,
                            env={**os.environ, "PYTHONPATH": path},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def kill_once_a_trial_ends(driver: subprocess.Popen[str], timeout: float = 600) -> None:
    """SIGKILLs a search driver and its Ray (its whole session) as soon as one trial has ended and others still
    run, or after ``timeout``."""
    deadline = time.monotonic() + timeout
    assert driver.stdout is not None
    for line in driver.stdout:
        if "completed" in line or "stopped by ASHA" in line or time.monotonic() > deadline:
            break
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
