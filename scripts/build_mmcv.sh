#!/usr/bin/env bash
# Builds mmcv 2.1.0 with its compiled ops as a wheel in OUT_DIR, against torch $TORCH_SPEC.
# PyPI has only mmcv 2.1.0's source, and OpenMMLab's prebuilt wheels stop at torch 2.1.
#
#   scripts/build_mmcv.sh OUT_DIR          CPU ops only: needs the CPU torch wheel.
#   scripts/build_mmcv.sh --cuda OUT_DIR   CPU and CUDA ops: needs the CUDA torch wheel (PyPI's default on Linux).
#
# The CUDA build takes nvcc, the CUDA runtime and headers from PyPI's cuda-toolkit packages, so it needs neither a
# GPU nor an NVIDIA base image. Environment: PYTHON (python3.11), TORCH_SPEC (torch==2.13.0), MAX_JOBS (2),
# TORCH_CUDA_ARCH_LIST (Turing through Blackwell; one arch, e.g. 9.0, builds several times faster).
set -euo pipefail

CUDA=0
if [ "${1:-}" = "--cuda" ]; then CUDA=1; shift; fi
if [ $# -ne 1 ]; then
  echo "usage: $0 [--cuda] OUT_DIR" >&2
  exit 2
fi
OUT=$1
PY=${PYTHON:-python3.11}
MMCV_VERSION=2.1.0
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
# nvcc's major version must match the one torch was built with (torch 2.13 on PyPI: CUDA 13.0).
CUDA_TOOLKIT="cuda-toolkit[nvcc,cudart,cccl,crt]==13.0.*"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-7.5;8.0;8.6;8.9;9.0;10.0;12.0}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PY" -m venv "$tmp/venv"
bpy=$tmp/venv/bin/python
# torch's extension builder looks for ninja on PATH; without it, it compiles one file at a time (MAX_JOBS ignored)
export PATH="$tmp/venv/bin:$PATH"
bpip() { "$bpy" -m pip --disable-pip-version-check -q "$@"; }

# mmcv's setup.py needs pkg_resources (setuptools<70) while torch 2.13 requires setuptools>=77,
# so the older setuptools is forced in after torch, in this throw-away venv only.
bpip install "$TORCH_SPEC" numpy ninja psutil wheel
bpip install "setuptools<70"
bpip download --no-deps --no-build-isolation "mmcv==$MMCV_VERSION" -d "$tmp/src"

if [ "$CUDA" = 1 ]; then
  if [ -z "$("$bpy" -c 'import torch; print(torch.version.cuda or "")')" ]; then
    echo "build_mmcv: pip resolved $TORCH_SPEC to a CPU-only build; a CUDA build needs the CUDA torch wheel" \
      "(PyPI's default on Linux): check pip's find-links / index settings (pip config list)" >&2
    exit 2
  fi
  bpip install "$CUDA_TOOLKIT"
  CUDA_HOME=$("$bpy" -c 'import glob, nvidia; print(glob.glob(f"{nvidia.__path__[0]}/cu13")[0])')
  export CUDA_HOME PATH="$CUDA_HOME/bin:$PATH"
  # torch's extension builder links `-L$CUDA_HOME/lib -lcudart`; the pip layout ships only libcudart.so.13,
  # so the unversioned name the linker looks for comes from a private folder (the soname stays libcudart.so.13).
  mkdir "$tmp/cudalib"
  ln -s "$CUDA_HOME/lib/libcudart.so.13" "$tmp/cudalib/libcudart.so"
  export LIBRARY_PATH="$tmp/cudalib${LIBRARY_PATH:+:$LIBRARY_PATH}"
  export FORCE_CUDA=1
  echo "build_mmcv: CUDA ops for arches $TORCH_CUDA_ARCH_LIST with $("$CUDA_HOME/bin/nvcc" --version | tail -1)" >&2
else
  export FORCE_CUDA=0
fi

mkdir -p "$OUT"
# Verbose: the compile takes from 10 minutes (CPU) to hours (CUDA, all arches) and shows its progress.
MAX_JOBS=${MAX_JOBS:-2} MMCV_WITH_OPS=1 \
  "$bpy" -m pip --disable-pip-version-check -v wheel --no-deps --no-build-isolation -w "$OUT" "$tmp/src/mmcv-$MMCV_VERSION.tar.gz"
