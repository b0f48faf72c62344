#!/usr/bin/env bash
# Ray worker node: joins the head at RAY_HEAD_ADDRESS with the cluster's token (RAY_AUTH_MODE=token).
#
# Environment: RAY_AUTH_TOKEN (required, the head's token), RAY_HEAD_ADDRESS (ray-head:6379), RAY_NODE_IP,
# RAY_WORKER_NUM_CPUS / RAY_WORKER_NUM_GPUS (detected when empty: the GPUs compose reserved for this container).
# Arguments are passed on to `ray start`. Runs in the foreground (--block) until SIGTERM.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$(dirname "$0")/common.sh"

require_secret RAY_AUTH_TOKEN 32
export RAY_AUTH_MODE=token
unset RAY_AUTH_TOKEN_PATH

args=(--address "${RAY_HEAD_ADDRESS:-ray-head:6379}" --block --disable-usage-stats)
if [ -n "${RAY_NODE_IP:-}" ]; then args+=(--node-ip-address "$RAY_NODE_IP"); fi
if [ -n "${RAY_WORKER_NUM_CPUS:-}" ]; then args+=(--num-cpus "$RAY_WORKER_NUM_CPUS"); fi
if [ -n "${RAY_WORKER_NUM_GPUS:-}" ]; then args+=(--num-gpus "$RAY_WORKER_NUM_GPUS"); fi

exec ray start "${args[@]}" "$@"
