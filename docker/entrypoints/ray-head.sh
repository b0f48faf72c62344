#!/usr/bin/env bash
# Ray head node: GCS, dashboard and job API, with token authentication on (Ray >= 2.52: RAY_AUTH_MODE=token).
#
# Environment: RAY_AUTH_TOKEN (required, the cluster's shared secret), RAY_NODE_IP, RAY_GCS_PORT (6379),
# RAY_DASHBOARD_HOST (0.0.0.0: inside the container; compose decides what the host exposes), RAY_DASHBOARD_PORT
# (8265), RAY_HEAD_NUM_CPUS (detected), RAY_HEAD_NUM_GPUS (0: the head schedules, GPU workers train), RAY_TEMP_DIR.
# Arguments are passed on to `ray start`. Runs in the foreground (--block): SIGTERM stops every Ray process it
# started, which is what `docker compose stop` sends.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$(dirname "$0")/common.sh"

require_secret RAY_AUTH_TOKEN 32
export RAY_AUTH_MODE=token
unset RAY_AUTH_TOKEN_PATH  # one source of truth: the token from the environment

args=(--head --block --disable-usage-stats
  --port "${RAY_GCS_PORT:-6379}"
  --dashboard-host "${RAY_DASHBOARD_HOST:-0.0.0.0}"
  --dashboard-port "${RAY_DASHBOARD_PORT:-8265}"
  --num-gpus "${RAY_HEAD_NUM_GPUS:-0}")
if [ -n "${RAY_NODE_IP:-}" ]; then args+=(--node-ip-address "$RAY_NODE_IP"); fi
if [ -n "${RAY_HEAD_NUM_CPUS:-}" ]; then args+=(--num-cpus "$RAY_HEAD_NUM_CPUS"); fi
if [ -n "${RAY_TEMP_DIR:-}" ]; then args+=(--temp-dir "$RAY_TEMP_DIR"); fi

exec ray start "${args[@]}" "$@"
