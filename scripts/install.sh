#!/usr/bin/env bash
# Creates $VENV (default .venv) and installs the pinned stack. mmcv 2.1.0 has no CPU wheel on PyPI:
# take it from $DETTUNE_WHEELHOUSE when given, else build it once from source and cache the wheel
# under ${XDG_CACHE_HOME:-~/.cache}/dettune/wheels/torch-<version> so the next install reuses it.
# Every failure ends with one line on stderr naming the step and what to do, and a non-zero exit.
# --gpu (or DETTUNE_GPU=1): torch's CUDA build (PyPI's default on Linux) and mmcv with its CUDA ops, compiled by
# scripts/build_mmcv.sh --cuda for the GPU generations in TORCH_CUDA_ARCH_LIST; DETTUNE_WHEELHOUSE is not used.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3.11}
PYTHONS="3.11 3.12 3.13"
# Exact versions of everything else (scripts/lock.sh writes it); pyproject.toml keeps ranges for library users.
LOCK=requirements/lock.txt
TORCH_VERSION=2.13.0
MMCV=mmcv==2.1.0
MMCV_VERSION=${MMCV#mmcv==}
# The cached wheel is compiled against one torch's C++ ABI, so the cache is keyed by it.
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/dettune/wheels/torch-$TORCH_VERSION
BUILD_DIR=""
WHEEL=""
export DETTUNE_GPU=${DETTUNE_GPU:-0}
if [ "${1:-}" = "--gpu" ]; then DETTUNE_GPU=1; fi
if [ "$DETTUNE_GPU" = 1 ]; then
  # The wheel holds device code for the listed GPU generations only, so its cache is keyed by them too.
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-7.5;8.0;8.6;8.9;9.0;10.0;12.0}
  CACHE=$CACHE-cuda-${TORCH_CUDA_ARCH_LIST//;/-}
  DETTUNE_WHEELHOUSE=""
fi
trap '[ -z "$BUILD_DIR" ] || rm -rf "$BUILD_DIR"' EXIT

say() { echo "install: $*" >&2; }
fail() { say "$1 failed: $2"; exit 1; }
pip_in() { local venv=$1; shift; "$venv/bin/python" -m pip --disable-pip-version-check -q "$@"; }
# pip prints its own error above; the step says what the user can do about it.
pip_step() {
  local step=$1 venv=$2; shift 2
  pip_in "$venv" "$@" || fail "$step" "pip's error is above; check that this machine reaches the package index \
(\`pip config list\` shows which) and re-run"
}

check_python() {
  local version
  command -v "$PY" >/dev/null 2>&1 ||
    fail "finding Python" "no '$PY' on this machine; install Python 3.11 or set PYTHON=/path/to/python3.12 (or 3.13)"
  version=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) || version=""
  case " $PYTHONS " in
    *" $version "*) PY_VERSION=$version PY_TAG=cp${version/./} ;;
    *) fail "finding Python" "'$PY' is Python $("$PY" -c 'import platform; print(platform.python_version())' \
2>/dev/null || echo '?'), dettune needs ${PYTHONS// /, }; set PYTHON=/path/to/python3.12 (for example)" ;;
  esac
}

check_compiler() {
  command -v "${CXX:-c++}" >/dev/null 2>&1 ||
    fail "building mmcv" "no C++ compiler ('${CXX:-c++}') to build mmcv $MMCV_VERSION from source; install one \
(Debian/Ubuntu: apt-get install build-essential) or set DETTUNE_WHEELHOUSE to a folder holding a prebuilt mmcv wheel"
}

make_venv() {
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV" ||
    fail "creating $VENV" "'$PY -m venv' did not work; on Debian/Ubuntu install python$PY_VERSION-venv"
}

mmcv_loads() { "$VENV/bin/python" -c "import mmcv.ops" >/dev/null 2>&1; }

# mmcv's compiled ops alone, before its Python dependencies (they come with dettune's): a wheel compiled against
# another torch installs fine and fails only when this library loads (undefined symbol).
ops_load() {
  "$VENV/bin/python" - >/dev/null 2>&1 <<'PY'
import glob, importlib.util, os
import torch  # noqa: F401  first: the ops link against its libraries
package = importlib.util.find_spec("mmcv").submodule_search_locations[0]
(library,) = glob.glob(os.path.join(package, "_ext*.so"))
spec = importlib.util.spec_from_file_location("mmcv._ext", library)
ext = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ext)
# A GPU install needs the CUDA ops: a CPU-only mmcv loads fine but has none.
raise SystemExit(os.environ["DETTUNE_GPU"] == "1" and ext.get_compiling_cuda_version() == "not available")
PY
}

find_mmcv_wheel() {
  local dir whl
  for dir in "${DETTUNE_WHEELHOUSE:-}" "$CACHE"; do
    [ -n "$dir" ] || continue
    for whl in "$dir/mmcv-$MMCV_VERSION-$PY_TAG"-*.whl; do
      [ -f "$whl" ] && { echo "$whl"; return 0; }
    done
  done
  return 1
}

install_torch() {
  # torch first, alone: on these machines `torch==2.13.0` resolves to a local CPU wheel for Python 3.11; for 3.12 and
  # 3.13 to PyPI's (the CUDA build).
  pip_step "installing torch $TORCH_VERSION" "$VENV" install -c "$LOCK" "torch==$TORCH_VERSION" numpy wheel
  if "$VENV/bin/python" -c 'import sys, torch; sys.exit(torch.version.cuda is None)'; then
    [ "$DETTUNE_GPU" = 1 ] || say "torch $TORCH_VERSION is the CUDA build (PyPI's Linux wheel, several GB with its \
CUDA libraries); it runs on the CPU too. For the CPU build, install it into $VENV from PyTorch's CPU index first \
(README, Set-up)"
  else
    [ "$DETTUNE_GPU" = 0 ] || fail "installing torch $TORCH_VERSION for CUDA" "pip installed the CPU-only build; \
the CUDA build is PyPI's default on Linux: check pip's find-links and index (\`pip config list\`)"
  fi
}

# mmcv's setup.py needs pkg_resources (setuptools<70) while torch 2.13 requires setuptools>=77,
# so the build gets a throw-away venv where the older setuptools is forced in after torch.
# The wheel is built there and moved into the cache only once complete; WHEEL names it.
build_mmcv_wheel() {
  BUILD_DIR=$(mktemp -d)
  local venv=$BUILD_DIR/venv whl
  mkdir -p "$BUILD_DIR/wheels"
  if [ "$DETTUNE_GPU" = 1 ]; then
    say "no mmcv $MMCV_VERSION CUDA wheel in $CACHE; building it for $TORCH_CUDA_ARCH_LIST (see README, GPU machines)"
    bash scripts/build_mmcv.sh --cuda "$BUILD_DIR/wheels" ||
      fail "building mmcv with CUDA" "the error is above; scripts/build_mmcv.sh --cuda needs a C++ compiler"
  else
    build_cpu_wheel "$venv"
  fi
  for whl in "$BUILD_DIR"/wheels/mmcv-*.whl; do
    WHEEL=$CACHE/$(basename "$whl")
    { mkdir -p "$CACHE" && cp "$whl" "$WHEEL.part" && mv "$WHEEL.part" "$WHEEL"; } ||
      fail "caching the mmcv wheel" "could not write $CACHE; free space there or set XDG_CACHE_HOME elsewhere"
  done
}

build_cpu_wheel() {
  local venv=$1
  say "no mmcv $MMCV_VERSION wheel in DETTUNE_WHEELHOUSE or $CACHE; building from source (~11 min on 2 cores)"
  "$PY" -m venv "$venv" || fail "building mmcv" "'$PY -m venv' did not work; on Debian/Ubuntu install python$PY_VERSION-venv"
  pip_step "building mmcv (installing its build tools)" "$venv" install -c "$LOCK" "torch==$TORCH_VERSION" numpy ninja \
    psutil wheel
  pip_step "building mmcv (installing setuptools<70)" "$venv" install --no-warn-conflicts "setuptools<70"
  pip_step "building mmcv (downloading its source)" "$venv" download --no-deps --no-build-isolation "$MMCV" \
    -d "$BUILD_DIR/src"
  # the build venv's ninja on PATH: torch's extension builder compiles one file at a time without it
  PATH="$venv/bin:$PATH" MAX_JOBS=${MAX_JOBS:-2} MMCV_WITH_OPS=1 FORCE_CUDA=0 \
    pip_in "$venv" wheel --no-deps --no-build-isolation -w "$BUILD_DIR/wheels" \
    "$BUILD_DIR/src/mmcv-$MMCV_VERSION.tar.gz" ||
    fail "building mmcv" "the compiler's error is above; mmcv $MMCV_VERSION needs a C++17 compiler and torch's headers"
}

install_mmcv() {
  local wheel=$1
  say "installing mmcv from $wheel"
  pip_step "installing mmcv" "$VENV" install --no-deps --force-reinstall "$wheel"
  ops_load || fail "loading mmcv's ops" "$wheel does not load with torch $TORCH_VERSION (built for another torch?); \
remove it, or unset DETTUNE_WHEELHOUSE, and re-run to build mmcv from source"
}

main() {
  check_python
  make_venv
  if ! ops_load; then
    WHEEL=$(find_mmcv_wheel) || check_compiler
  fi
  install_torch
  if ! ops_load; then
    [ -n "$WHEEL" ] || build_mmcv_wheel
    install_mmcv "$WHEEL"
  fi
  pip_step "installing dettune and its dependencies" "$VENV" install -c "$LOCK" -e ".[dev]"
  mmcv_loads || fail "importing mmcv.ops" "run '$VENV/bin/python -c \"import mmcv.ops\"' to see why; \
removing $VENV and re-running installs everything afresh"
}

main "$@"
