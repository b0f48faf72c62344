"""scripts/install.sh run as on a fresh machine, and the one source build of mmcv started when the session starts.

The source build takes about 11 minutes of both cores. The suite leaves much of the machine idle while its tests
wait on servers, clusters and subprocesses, so the build runs from the start of the session at the lowest
priority (Linux's idle scheduling class, below even nice 19 and Ray's nice-15 workers, and the idle I/O class:
it gets the cycles and disk the tests leave, the tests keep theirs), and its test runs last and checks what it
made.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
INSTALL = REPO / "scripts" / "install.sh"
SOURCE_BUILD_PYTHON = "3.11"
BUILD_TIMEOUT_S = 3000  # the source build alone is ~11 min on an idle 2-core machine; CI machines are slower


def install_environment(venv: Path, cache: Path, wheelhouse: Path | None, drop: tuple[str, ...] = (),
                        **env: str) -> dict[str, str]:
    """install.sh's environment with only the given venv, wheelhouse and cache, as on a fresh machine.

    ``drop`` names more variables to leave out; ``env`` sets others.
    """
    environ = {k: v for k, v in os.environ.items() if k not in ("DETTUNE_WHEELHOUSE", "VIRTUAL_ENV", *drop)}
    environ.update(VENV=str(venv), XDG_CACHE_HOME=str(cache), **env)
    if wheelhouse is not None:
        environ["DETTUNE_WHEELHOUSE"] = str(wheelhouse)
    return environ


def python_of(version: str) -> str:
    """A working ``python3.X`` on PATH, else pyenv's (its shims exist but fail for a version not selected)."""
    candidates = [shutil.which(f"python{version}") or ""]
    candidates += sorted(glob.glob(os.path.expanduser(f"~/.pyenv/versions/{version}.*/bin/python")))
    for python in candidates:
        if python and subprocess.run([python, "-c", ""], capture_output=True).returncode == 0:
            return python
    raise AssertionError(f"this test needs Python {version} (python{version} on PATH or under pyenv)")


@dataclass
class SourceBuild:
    """install.sh into a fresh venv with an empty wheelhouse and cache: it must build mmcv from source."""

    folder: Path
    process: subprocess.Popen[bytes]

    @property
    def venv(self) -> Path:
        return self.folder / "venv"

    @property
    def cache(self) -> Path:
        return self.folder / "cache"

    @property
    def wheelhouse(self) -> Path:
        return self.folder / "wheelhouse"

    @classmethod
    def start(cls) -> SourceBuild:
        folder = Path(tempfile.mkdtemp(prefix="dettune-source-build-"))
        (folder / "wheelhouse").mkdir()
        environ = install_environment(folder / "venv", folder / "cache", folder / "wheelhouse",
                                      PYTHON=python_of(SOURCE_BUILD_PYTHON))
        with open(folder / "install.log", "wb") as log:
            lowest_priority = ["chrt", "--idle", "0", "ionice", "-c", "3"]
            process = subprocess.Popen([*lowest_priority, "bash", str(INSTALL)], cwd=REPO, env=environ, stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        return cls(folder, process)

    def wait(self) -> tuple[int, str]:
        """install.sh's exit status and its output, once it has ended (or BUILD_TIMEOUT_S after the start)."""
        returncode = self.process.wait(timeout=BUILD_TIMEOUT_S)
        return returncode, (self.folder / "install.log").read_text(errors="replace")

    def remove(self) -> None:
        """Stops the build if it still runs (its own process group) and removes its folder."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, 9)
            self.process.wait()
        shutil.rmtree(self.folder, ignore_errors=True)
