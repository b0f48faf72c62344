"""`ray up`, `ray submit` and `ray down` with docker/ray-cluster.local.yaml, for real: Ray's cluster launcher
(provider `local`) SSHes into an sshd this test starts on 127.0.0.1, starts Ray there with the file's commands,
runs a two-trial demo search with `ray submit`, and stops the cluster again.

The node is a user of the test's own (``SSH_USER``, made with useradd, so the test runs as root): `ray down` runs
`ray stop` on the head (ray/autoscaler/_private/commands.py, teardown_cluster), and so do the file's start
commands, and `ray stop` signals every process named like one of Ray's (ray/scripts/scripts.py, kill_procs),
whoever started it. ``SSH_USER`` cannot signal root's processes, so it ends this cluster only, not other tests'
Ray or a benchmark running as root: a decoy named `raylet`, started here as root, must outlive `ray down`. The
user's RAY_TMPDIR keeps its Ray files (and `ray stop`'s removal of the cluster address file) out of /tmp/ray, which
any user may write; its home is this run's temp folder. The launcher's own files (the cluster state, its config
cache) go to this test's tmp_path through HOME, TMPDIR and RAY_TMPDIR.

The launcher has no SSH port setting, so the cluster file gets `ssh_proxy_command: nc %h PORT`, as the file's
comment tells users whose sshd listens elsewhere than on 22.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from services import BIN, agent_ports, free_port, free_ports, kill_until_gone, mlflow_server, tail

from cocodata.synth import write_dataset

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
CLUSTER_FILE = REPO / "docker" / "ray-cluster.local.yaml"
SSHD = "/usr/sbin/sshd"  # sshd re-executes itself and insists on an absolute path
SSH_USER = "dettune-rayup"
USER_COMMENT = "dettune tests, a node for ray up over SSH"
LOCK = Path("/tmp/dettune-rayup.lock")  # runs share SSH_USER, and `ray stop` ends all of its Ray: one at a time
PACKAGES = "apt-get install -y openssh-server rsync netcat-openbsd acl"
SEARCH = "rayup-demo"


@dataclass(frozen=True)
class Node:
    """The head's side: ``SSH_USER``'s home (this run's temp folder) and uid."""

    home: Path
    uid: int


def require_root_and_tools() -> None:
    if os.geteuid() != 0:
        pytest.fail("this test makes a user of its own (useradd) for the SSH node: run it as root; logged in as "
                    "yourself, `ray down`'s `ray stop` would end every Ray process of yours")
    missing = [tool for tool in (SSHD, "ssh", "ssh-keygen", "rsync", "nc", "setfacl") if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"missing {', '.join(missing)}: {PACKAGES}")


def keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True, capture_output=True)


def node_user() -> pwd.struct_passwd:
    """``SSH_USER``, made on the first run: no password (``*``, not locked: sshd refuses locked accounts)."""
    try:
        user = pwd.getpwnam(SSH_USER)
    except KeyError:
        subprocess.run(["useradd", "--no-create-home", "--shell", "/bin/bash", "--password", "*",
                        "--comment", USER_COMMENT, SSH_USER], check=True, capture_output=True, text=True)
        user = pwd.getpwnam(SSH_USER)
    if user.pw_gecos != USER_COMMENT or user.pw_uid == 0:
        pytest.fail(f"the user {SSH_USER} exists and is not this test's ({user.pw_gecos!r}); remove or rename it")
    return user


def processes_of(uid: int) -> dict[int, str]:
    """pid -> name of every process running as ``uid``."""
    found = {}
    for entry in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            if entry.stat().st_uid == uid:
                found[int(entry.name)] = (entry / "comm").read_text().strip()
    return found


def kill_processes_of(uid: int) -> None:
    """SIGKILLs every process of ``uid`` (the test's own user: all of them are this test's), by pid."""
    kill_until_gone(lambda: processes_of(uid))


def named_acl_entries(folder: Path) -> set[str]:
    """``user:NAME`` and ``group:NAME`` entries of ``folder``'s ACL (none for plain mode bits)."""
    listed = subprocess.run(["getfacl", "--omit-header", "--absolute-names", str(folder)], check=True,
                            capture_output=True, text=True).stdout.splitlines()
    return {line.rsplit(":", 1)[0] for line in listed if line.startswith(("user:", "group:"))
            and line.split(":")[1]}


@contextlib.contextmanager
def python_reachable_by(user: pwd.struct_passwd) -> Iterator[None]:
    """``user`` may run this venv's Python: a folder on its way that others may not pass (a pyenv Python under
    /root, 0700) gets an ACL entry letting ``user`` through (--x: no listing), removed afterwards."""
    needed = {Path(sys.executable).resolve(), BIN.resolve(), REPO.resolve()}
    closed = sorted({folder for path in needed for folder in path.parents if not folder.stat().st_mode & 0o001})
    for folder in closed:
        named = named_acl_entries(folder)
        if named - {f"user:{user.pw_name}"}:  # only ours: left by a run killed before its clean-up
            pytest.fail(f"{folder} has an ACL of its own ({', '.join(sorted(named))}); let {user.pw_name} pass it "
                        f"(setfacl -m u:{user.pw_name}:x {folder})")
    try:
        for folder in closed:
            subprocess.run(["setfacl", "-m", f"u:{user.pw_name}:x", str(folder)], check=True)
        yield
    finally:
        for folder in closed:
            subprocess.run(["setfacl", "-b", str(folder)], check=True)


@contextlib.contextmanager
def ssh_node(client_key: Path) -> Iterator[Node]:
    """``SSH_USER`` with a fresh home in /tmp (Ray's socket paths must stay under 107 bytes): ``client_key`` may log
    in, ~/.bashrc puts this venv first on PATH, turns token mode on, gives Ray its own temp folder and keeps it on
    the loopback address; a demo dataset in ~/data, the search's storage ~/runs."""
    with LOCK.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        user = node_user()
        kill_processes_of(user.pw_uid)  # left by a run killed before its clean-up
        home = Path(tempfile.mkdtemp(prefix="rayup", dir="/tmp"))
        try:
            subprocess.run(["usermod", "--home", str(home), SSH_USER], check=True, capture_output=True, text=True)
            (home / ".ssh").mkdir(mode=0o700)
            shutil.copy(client_key.with_suffix(".pub"), home / ".ssh" / "authorized_keys")
            (home / ".bashrc").write_text(f'export PATH="{BIN}:$PATH"\n'
                                          'export RAY_TMPDIR="$HOME/tmp" RAY_AUTH_MODE=token\n'
                                          'export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0\n')  # Ray on 127.0.0.1
            (home / "tmp").mkdir()
            (home / "runs").mkdir()
            write_dataset(home / "data", images=16, size=160, seed=0)
            subprocess.run(["chown", "-R", f"{user.pw_uid}:{user.pw_gid}", str(home)], check=True)
            home.chmod(0o700)
            with python_reachable_by(user):
                yield Node(home, user.pw_uid)
        finally:
            kill_processes_of(user.pw_uid)
            shutil.rmtree(home, ignore_errors=True)


@contextlib.contextmanager
def sshd(tmp: Path) -> Iterator[int]:
    """sshd on 127.0.0.1 with a host key and a config of its own, for ``SSH_USER`` and public keys only; yields
    its port. Ended by its pid."""
    port = free_port()
    host_key = tmp / "ssh_host_ed25519_key"
    keygen(host_key)
    config = tmp / "sshd_config"
    config.write_text(f"ListenAddress 127.0.0.1\nPort {port}\nHostKey {host_key}\nPidFile none\n"
                      f"AllowUsers {SSH_USER}\nAuthenticationMethods publickey\nPasswordAuthentication no\n"
                      "KbdInteractiveAuthentication no\nUsePAM no\nPermitRootLogin no\nX11Forwarding no\n"
                      "PrintMotd no\n")
    # sshd's privilege separation folder; its service makes it at boot, where there is one
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    subprocess.run([SSHD, "-t", "-f", str(config)], check=True, capture_output=True, text=True)
    log = tmp / "sshd.log"
    with log.open("wb") as out:
        server = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert server.poll() is None, f"sshd exited with {server.returncode}:\n{tail(log)}"
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
                break
            assert time.monotonic() < deadline, f"sshd did not listen on {port}:\n{tail(log)}"
            time.sleep(0.2)
        yield port
    finally:
        server.terminate()
        server.wait(timeout=30)


@contextlib.contextmanager
def raylet_decoy(tmp: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A root process named `raylet` (a copy of sleep): `ray stop` picks it by that name."""
    decoy = tmp / "raylet"
    shutil.copy("/bin/sleep", decoy)
    process = subprocess.Popen([str(decoy), "3600"])
    try:
        yield process
    finally:
        process.kill()
        process.wait(timeout=30)


def cluster_file(tmp: Path, client_key: Path, ssh_port: int) -> Path:
    """docker/ray-cluster.local.yaml for a head on 127.0.0.1 reached as ``SSH_USER`` through ``ssh_port``; its
    `ray start --head` gets free ports appended (the last of a repeated flag wins): other Ray clusters on this
    machine may hold the defaults."""
    config = yaml.safe_load(CLUSTER_FILE.read_text())
    config["cluster_name"] = f"dettune-test-{secrets.token_hex(4)}"
    config["provider"].update(head_ip="127.0.0.1", worker_ips=[])
    config["auth"] = {"ssh_user": SSH_USER, "ssh_private_key": str(client_key),
                      "ssh_proxy_command": f"nc %h {ssh_port}"}
    gcs, objects, node_manager, dashboard = free_ports(4)
    ports = (f"--node-ip-address=127.0.0.1 --port={gcs} --object-manager-port={objects} "
             f"--node-manager-port={node_manager} --dashboard-port={dashboard} --num-cpus=2 --num-gpus=0 "
             + " ".join(agent_ports()))
    config["head_start_ray_commands"] = [f"{command} {ports}" if "ray start --head" in command else command
                                         for command in config["head_start_ray_commands"]]
    path = tmp / "cluster.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def dashboard_of(cluster: Path) -> str:
    command = next(c for c in yaml.safe_load(cluster.read_text())["head_start_ray_commands"] if "--head" in c)
    return f"http://127.0.0.1:{command.rsplit('--dashboard-port=', 1)[1].split()[0]}"


def launcher_env(tmp: Path) -> dict[str, str]:
    """The launcher's environment: its home, state and caches in ``tmp``, a token of this run's in
    ~/.ray/auth_token (`ray get-auth-token --generate`, as the cluster file's comment says)."""
    home, temp = tmp / "launcher-home", tmp / "launcher-tmp"
    home.mkdir()
    temp.mkdir()
    env = {**os.environ, "HOME": str(home), "TMPDIR": str(temp), "RAY_TMPDIR": str(temp),
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "RAY_USAGE_STATS_ENABLED": "0"}
    for inherited in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        env.pop(inherited, None)
    subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    return env


def ray_cli(env: dict[str, str], log_dir: Path, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """`ray ARGS` from the checkout's root, as a user runs it; its output is kept in ``log_dir``."""
    done = subprocess.run([str(BIN / "ray"), *args], cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout)
    (log_dir / f"ray-{args[0]}.log").write_text(done.stdout + done.stderr)
    return done


def remove_ssh_control_folder(cluster: Path) -> None:
    """The launcher's SSH multiplexing folder for this cluster, /tmp/ray_ssh_<user hash>/<cluster name hash>
    (ray/autoscaler/_private/command_runner.py: SSHCommandRunner; both hashes cut to 10 characters)."""
    name = yaml.safe_load(cluster.read_text())["cluster_name"]
    for folder in Path("/tmp").glob(f"ray_ssh_*/{hashlib.sha256(name.encode()).hexdigest()[:10]}"):
        shutil.rmtree(folder, ignore_errors=True)


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code


@pytest.mark.timeout(1500)
def test_ray_up_submit_and_down_over_ssh(tmp_path: Path) -> None:
    require_root_and_tools()
    client_key = tmp_path / "id_ed25519"
    keygen(client_key)
    (tmp_path / "mlflow").mkdir()
    with (ssh_node(client_key) as node, sshd(tmp_path) as ssh_port, mlflow_server(tmp_path / "mlflow") as tracking,
          raylet_decoy(tmp_path) as decoy):
        cluster = cluster_file(tmp_path, client_key, ssh_port)
        env = launcher_env(tmp_path)
        try:
            up = ray_cli(env, tmp_path, "up", "-y", "--no-config-cache", "--disable-usage-stats", str(cluster),
                         timeout=420)
            assert up.returncode == 0, (up.stdout + up.stderr)[-6000:]
            ray_names = set(processes_of(node.uid).values())
            assert {"gcs_server", "raylet"} <= ray_names, f"Ray should run on the node as {SSH_USER}: {ray_names}"
            assert http_status(f"{dashboard_of(cluster)}/api/jobs/") == 401, "token authentication should be on"

            submit = ray_cli(env, tmp_path, "submit", "--no-config-cache", str(cluster), "search/__main__.py", "--",
                             "search", "dettune-spaces/demo.yaml", "--address", "auto", "--name", SEARCH,
                             "--trials", "2", "--epochs", "2", "--data-root", str(node.home / "data"),
                             "--storage", str(node.home / "runs"), "--tracking-uri", tracking, timeout=720)
            assert submit.returncode == 0, (submit.stdout + submit.stderr)[-6000:]
            assert f"search {SEARCH}: best trial" in submit.stdout
        finally:
            down = ray_cli(env, tmp_path, "down", "-y", str(cluster), timeout=180)
            remove_ssh_control_folder(cluster)
        assert down.returncode == 0, (down.stdout + down.stderr)[-6000:]

        # The search joined the cluster `ray up` started (one Ray session on the node, none of its own), and its
        # trials ran there, as SSH_USER.
        assert len(list((node.home / "tmp" / "ray").glob("session_2*"))) == 1
        trial_files = [path for path in (node.home / "runs" / SEARCH).rglob("*") if path.is_file()]
        assert trial_files and all(path.stat().st_uid == node.uid for path in trial_files)

        client = MlflowClient(tracking)
        experiment = client.get_experiment_by_name(SEARCH)
        assert experiment is not None
        runs = client.search_runs([experiment.experiment_id])
        assert sorted(run.data.tags.get("dettune.role", "") for run in runs) == ["parent", "trial", "trial"]
        for run in runs:
            if run.data.tags["dettune.role"] == "trial":
                assert {"val/bbox_mAP", "train/loss"} <= set(run.data.metrics)

        # `ray down` stopped every Ray process on the node, and none of root's.
        deadline = time.monotonic() + 60
        while (left := {pid: name for pid, name in processes_of(node.uid).items() if not name.startswith("sshd")}):
            assert time.monotonic() < deadline, f"Ray processes left after `ray down`: {left}"
            time.sleep(1)
        assert decoy.poll() is None, "`ray down` stopped a root process named raylet"
