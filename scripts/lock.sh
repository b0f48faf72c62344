#!/usr/bin/env bash
# Writes requirements/lock.txt: one exact version for every package dettune installs (runtime and dev), the
# constraints scripts/install.sh and the images install with. pyproject.toml keeps ranges for library users.
#
#   scripts/lock.sh                 resolve pyproject's ranges afresh: the newest releases they allow today
#   scripts/lock.sh --from VENV     the versions installed in VENV (pip freeze), e.g. a venv just tested;
#                                   --from again adds another venv's (the CUDA build of torch under 3.12 pulls in
#                                   triton and the nvidia-* libraries the CPU build does not): one version each
#
# Either way it then checks that every pin has a wheel (or source) for each Python dettune supports, so a pin that
# would break `PYTHON=python3.13 make install` is found here. Left out: mmcv (install.sh builds it against torch),
# pip (the venv's own) and torch's local build label (+cpu), so one pin fits torch's CPU and CUDA builds.
# Environment: PYTHON (python3.11), the interpreter that resolves.
set -euo pipefail
cd "$(dirname "$0")/.."
LOCK=requirements/lock.txt
PY=${PYTHON:-python3.11}
PYTHONS="3.11 3.12 3.13"
TORCH_VERSION=$(sed -n 's/^TORCH_VERSION=//p' scripts/install.sh)

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# name==version lines on stdin -> the lock's body: sorted, mmcv and dettune out, local labels dropped.
normalise() {
  grep -E '^[A-Za-z0-9][A-Za-z0-9._-]*==' | grep -viE '^(mmcv|dettune|pip)==' | sed -E 's/\+[A-Za-z0-9.]+$//' |
    sort -f
}

resolved() {
  # --dry-run with --ignore-installed resolves as into an empty venv and installs nothing.
  "$PY" -m pip --disable-pip-version-check install --quiet --dry-run --ignore-installed --report "$tmp/report.json" \
    "torch==$TORCH_VERSION" -e ".[dev]" >&2
  "$PY" -c 'import json, sys
for item in json.load(open(sys.argv[1]))["install"]:
    print(f"{item[\"metadata\"][\"name\"]}=={item[\"metadata\"][\"version\"]}")' "$tmp/report.json"
}

frozen() {
  [ -x "${1:-}/bin/python" ] || { echo "lock.sh: --from needs a venv folder" >&2; exit 2; }
  "$1/bin/python" -m pip --disable-pip-version-check freeze --all --exclude-editable | normalise
}

case "${1:-}" in
  --from) while [ "${1:-}" = --from ]; do frozen "${2:-}" >> "$tmp/pins"; shift 2; done
          [ $# -eq 0 ] || { echo "usage: $0 [--from VENV]..." >&2; exit 2; }
          sort -fu "$tmp/pins" > "$tmp/body"
          twice=$(sed 's/==.*//' "$tmp/body" | tr 'A-Z_.' 'a-z--' | uniq -d)
          [ -z "$twice" ] || { echo "lock.sh: the venvs hold different versions of: $twice; the lock was not written" >&2
                               exit 1; } ;;
  "") resolved | normalise > "$tmp/body" ;;
  *) echo "usage: $0 [--from VENV]..." >&2; exit 2 ;;
esac

for version in $PYTHONS; do
  # metadata only (PEP 658): no wheel is downloaded
  "$PY" -m pip --disable-pip-version-check install --quiet --dry-run --no-deps --ignore-installed \
    --target "$tmp/target" --python-version "$version" --only-binary=:all: -r "$tmp/body" ||
    { echo "lock.sh: a pin above has no wheel for Python $version; the lock was not written" >&2; exit 1; }
done
{
  echo "# Written by scripts/lock.sh (README, Set-up: the lock); change pyproject.toml and re-run it, never edit this."
  cat "$tmp/body"
} > "$LOCK"
echo "lock.sh: $(wc -l < "$tmp/body") pins in $LOCK" >&2
