#!/usr/bin/env bash
# Creates .venv and installs the pinned stack. mmcv 2.1.0 has no CPU wheel on PyPI:
# take it from $DETTUNE_WHEELHOUSE when given, else build it once from source and cache the wheel
# under ${XDG_CACHE_HOME:-~/.cache}/dettune/wheels so the next install reuses it.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3.11}
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/dettune/wheels
MMCV=mmcv==2.1.0

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }

# torch first, alone: on these machines `torch==2.13.0` resolves to a local CPU wheel.
pip install torch==2.13.0 numpy wheel

find_mmcv_wheel() {
  local dir whl
  for dir in "${DETTUNE_WHEELHOUSE:-}" "$CACHE"; do
    [ -n "$dir" ] || continue
    for whl in "$dir"/mmcv-2.1.0-cp311-*.whl; do
      [ -f "$whl" ] && { echo "$whl"; return; }
    done
  done
}

# mmcv's setup.py needs pkg_resources (setuptools<70) while torch 2.13 requires setuptools>=77,
# so the build gets a throw-away venv where the older setuptools is forced in after torch.
build_mmcv_wheel() {
  local tmp; tmp=$(mktemp -d)
  "$PY" -m venv "$tmp/venv"
  local bpip="$tmp/venv/bin/python -m pip --disable-pip-version-check -q"
  $bpip install torch==2.13.0 numpy ninja psutil wheel
  $bpip install "setuptools<70"
  $bpip download --no-deps --no-build-isolation "$MMCV" -d "$tmp/src"
  mkdir -p "$CACHE"
  MAX_JOBS=${MAX_JOBS:-2} MMCV_WITH_OPS=1 FORCE_CUDA=0 \
    $bpip wheel --no-deps --no-build-isolation -w "$CACHE" "$tmp"/src/mmcv-2.1.0.tar.gz
  rm -rf "$tmp"
}

if ! "$VENV/bin/python" -c "import mmcv.ops" 2>/dev/null; then
  wheel=$(find_mmcv_wheel)
  if [ -z "$wheel" ]; then
    echo "install: no mmcv 2.1.0 wheel in DETTUNE_WHEELHOUSE or $CACHE; building from source (~11 min on 2 cores)" >&2
    build_mmcv_wheel
    wheel=$(find_mmcv_wheel)
  fi
  pip install --no-deps "$wheel"
fi

pip install -e ".[dev]"
