"""Connecting to Ray when ``ray start`` left a stale record behind (its processes killed, not stopped).

Each test writes Ray's own record of the last cluster, ``ray_current_cluster``, into a temp folder of its own
(``RAY_TMPDIR``), naming a port where nothing listens.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import write_space
from services import descendants, free_port, proc_bytes

from cocodata.dataset import Dataset
from search.cli import main
from search.driver import RayUnreachable, _check_ray_answers
from spaces.errors import USAGE_ERROR

RAY_STARTUP_S = 300


@pytest.fixture
def stale_record(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A RAY_TMPDIR whose ``ray/ray_current_cluster`` names a dead cluster; yields that address."""
    # Short: Ray's socket paths under it must stay within the 107 bytes a Unix socket name may have.
    temp = Path(tempfile.mkdtemp(prefix="dt-", dir="/tmp"))
    address = f"127.0.0.1:{free_port()}"
    (temp / "ray").mkdir()
    (temp / "ray" / "ray_current_cluster").write_text(address)
    monkeypatch.setenv("RAY_TMPDIR", str(temp))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    yield address
    shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_an_address_whose_cluster_is_gone_exits_2_at_once(how: str, stale_record: str, tmp_path: Path,
                                                          synth: Dataset, no_local_ray: None,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capfd: pytest.CaptureFixture[str]) -> None:
    # The recorded address itself: "auto" would also join any other live cluster on this machine.
    monkeypatch.chdir(tmp_path)
    space_file = write_space(tmp_path / "space.yaml", synth)
    before = sorted(tmp_path.rglob("*"))
    if how == "environment":
        monkeypatch.setenv("RAY_ADDRESS", stale_record)
    started = time.monotonic()

    code = main(["search", str(space_file), *(["--address", stale_record] if how == "flag" else [])])

    took = time.monotonic() - started
    err = capfd.readouterr().err
    assert code == USAGE_ERROR, err
    assert f"the Ray cluster at {stale_record} does not answer" in err and "ray start --head" in err
    assert "Traceback" not in err
    assert sorted(tmp_path.rglob("*")) == before, "a refused search wrote files"
    assert took < 120, f"refusing took {took:.0f} s"  # validation included; ray.init alone hung for minutes


@pytest.mark.slow
def test_without_an_address_a_private_ray_starts(stale_record: str) -> None:
    """It starts apart from the recorded cluster, and its workers hide GPUs from CPU tasks while the driver's
    environment stays as it was (a chain's next search, a library user's process)."""
    hide = "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO"
    probe = ("import os, ray; from search.driver import connect_ray; connect_ray(None); "
             "print('gcs', ray.get_runtime_context().gcs_address); "
             f"print('worker', ray.get(ray.remote(lambda: os.environ.get({hide!r})).remote())); "
             f"print('driver', os.environ.get({hide!r}))")
    env = {k: v for k, v in os.environ.items() if k != hide}
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=RAY_STARTUP_S,
                          env=env, cwd=Path(__file__).parents[2])

    assert done.returncode == 0, done.stderr[-3000:]
    printed = dict(line.split(maxsplit=1) for line in done.stdout.splitlines() if line.split()[0] in
                   ("gcs", "worker", "driver"))
    assert printed["gcs"] != stale_record
    assert (printed["worker"], printed["driver"]) == ("1", "None")


def test_auto_resolves_as_ray_init_does_and_a_dead_cluster_is_refused(stale_record: str,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """``auto`` goes through the one private Ray function the driver calls: this fails if Ray moves or changes it."""
    monkeypatch.setenv("RAY_ADDRESS", stale_record)  # what `auto` resolves to first, whatever else runs here

    with pytest.raises(RayUnreachable, match=f"the Ray cluster at 'auto' \\({stale_record}, as Ray last recorded"):
        _check_ray_answers("auto")


HANG_RAYLET_START = """\
# Loaded by every Python process of the test's driver (sitecustomize): Ray's start hangs where the raylet would be
# spawned, as a start forked beside a busy thread once did (its child deadlocked before its exec).
import time

import ray._private.services


def _hang(*args, **kwargs):
    time.sleep(3600)


ray._private.services.start_raylet = _hang
"""


@pytest.mark.slow
def test_a_local_ray_start_that_hangs_ends_the_search_with_a_message(tmp_path: Path, synth: Dataset) -> None:
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(HANG_RAYLET_START)
    space_file = write_space(tmp_path / "space.yaml", synth)
    seconds = 15
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "inject"), os.environ.get("PYTHONPATH", "")]),
           "DETTUNE_RAY_START_TIMEOUT_S": str(seconds)}
    env.pop("RAY_ADDRESS", None)
    driver = subprocess.Popen([sys.executable, "-m", "search", "search", str(space_file)], cwd=tmp_path, env=env,
                              text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    spawned: set[int] = set()
    deadline = time.monotonic() + RAY_STARTUP_S
    while driver.poll() is None and time.monotonic() < deadline:
        spawned |= set(descendants(driver.pid))  # Ray's GCS and the rest it started before the raylet
        time.sleep(0.5)
    if driver.poll() is None:
        driver.kill()
    output = driver.communicate()[0]

    assert driver.returncode == 1, output[-3000:]
    assert f"Ray's local start did not finish within {seconds} s" in output and "Traceback" not in output, output
    assert spawned, "the driver started no process: the hang was not reached"
    time.sleep(2)
    assert [pid for pid in spawned if _alive(pid)] == [], "the hung start left processes behind"
    assert not (tmp_path / "runs" / "t").exists(), "the search wrote its folder before Ray had started"


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting for its new parent to reap it."""
    stat = proc_bytes(f"/proc/{pid}/stat")
    return bool(stat) and stat.rsplit(b")", 1)[-1].split()[0] != b"Z"
