#!/usr/bin/env bash
# The cluster images built and run for real, with podman: docker/smoke.sh [OPTIONS] (also `make image-test`).
#
#  1. builds the `cpu` and `mlflow` images from docker/Dockerfile, and with --gpu ARCHES the `gpu` image, mmcv's CUDA
#     ops compiled for those GPU generations, checking in it (on this machine's CPU: no GPU needed) that mmcv's ops
#     hold CUDA code and load with torch's CUDA build;
#  2. in the cpu image: `dettune validate spaces/demo.yaml` and a two-trial, two-epoch demo search (no network);
#  3. brings docker/compose.yaml up with podman-compose under a project name of its own (ray-head, one
#     ray-worker-cpu, mlflow with basic auth over postgres), published ports on 127.0.0.1 only;
#  4. checks that the job API refuses a request without the Ray token, then submits the demo search (two trials of
#     two epochs: ASHA needs an epoch after its first rung) with `ray job submit` and the token, from a client
#     container on the host's network;
#  5. reads the runs back through MLflow's REST API with the password, checks they are refused without it (and with
#     a wrong one) and that they sit in PostgreSQL;
#  6. submits a second search and stops its job (`ray job stop`) once a trial has finished an epoch;
#  7. `compose down` (the named volumes stay) and `up` again: the first search's runs read back unchanged;
#  8. `dettune resume` of the stopped search, as a job on the restarted cluster: its runs all finish.
# It prints how long each step took, and on exit removes the containers, networks and volumes of its own compose
# project and the one-off containers it named; nothing else. Images stay cached for the next run.
# CI does not run it (a first build takes minutes to tens of minutes); it needs podman, podman-compose, curl, python3.
#
# Options:
#   --local-bases          build the base images from Debian bookworm's packages instead of pulling them (for
#                          machines without a container registry): a python3.11 base with its headers (mmdebstrap,
#                          the host's extra CA certificates from /usr/local/share/ca-certificates included) and a
#                          PostgreSQL 15 stand-in (docker/smoke/postgres.Containerfile); MinIO is replaced by a file
#                          artifact volume on the mlflow service (docker/smoke/compose.local.yaml). Needs mmdebstrap.
#   --rebuild-bases        build the local python base even if an earlier run left one (it is reused otherwise)
#   --python-image IMAGE   the Dockerfile's PYTHON_IMAGE (default: the Dockerfile's own, or the local base)
#   --torch-index URL      the Dockerfile's TORCH_CPU_INDEX_URL (default: the Dockerfile's own, PyTorch's CPU index)
#   --pip-find-links DIR   a folder of wheels pip may take during the build (default: $PIP_FIND_LINKS when it is
#                          one folder); mounted read-only into the build, named in a pip.conf mounted with it
#   --mmcv-wheelhouse DIR  a folder with an mmcv-2.1.0-cp311 wheel built against torch 2.13.0+cpu, used instead of
#                          compiling mmcv (default: $DETTUNE_WHEELHOUSE, as scripts/install.sh; empty: compile)
#   --gpu ARCHES           also build the gpu image, its mmcv CUDA ops for ARCHES (TORCH_CUDA_ARCH_LIST, e.g. 9.0;
#                          one arch builds several times faster than the Dockerfile's seven). Its pip takes torch
#                          from PyPI (the CUDA build), never from --pip-find-links, which may hold the CPU build.
#   --runc                 run podman with runc, cgroupfs and no default ulimits (a containers.conf of its own), for
#                          sandboxes where crun or systemd cgroups fail
#   --keep-logs DIR        write each step's full log under DIR (default: a new folder under ${TMPDIR:-/tmp})
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
DOCKER=$REPO/docker
PYTHON_BASE_DEFAULT=python:3.11.14-slim-bookworm
LOCAL_PYTHON_IMAGE=localhost/dettune-smoke-python:3.11-bookworm
LOCAL_POSTGRES_IMAGE=localhost/dettune-smoke-postgres:15
IMAGE=localhost/dettune-smoke
VERSION=0.1.0
SEARCH=smoke-demo
RESUMED=smoke-resume

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
}

bad() {
  echo "smoke.sh: $*" >&2
  exit 2
}

local_bases=0 rebuild_bases=0 runc=0 python_image="" torch_index="" logs="" gpu_arches=""
find_links=""
case ${PIP_FIND_LINKS:-} in *" "* | "") ;; *) [ -d "$PIP_FIND_LINKS" ] && find_links=$PIP_FIND_LINKS ;; esac
wheelhouse=${DETTUNE_WHEELHOUSE:-}
while [ $# -gt 0 ]; do
  case $1 in
    --local-bases) local_bases=1 ;;
    --rebuild-bases) rebuild_bases=1 ;;
    --runc) runc=1 ;;
    --python-image | --torch-index | --pip-find-links | --mmcv-wheelhouse | --keep-logs | --gpu)
      [ $# -ge 2 ] && [ -n "$2" ] || bad "$1 needs a value (see --help)"
      case $1 in
        --python-image) python_image=$2 ;;
        --torch-index) torch_index=$2 ;;
        --pip-find-links) find_links=$2 ;;
        --mmcv-wheelhouse) wheelhouse=$2 ;;
        --keep-logs) logs=$2 ;;
        --gpu) gpu_arches=$2 ;;
      esac
      shift ;;
    -h | --help) usage; exit 0 ;;
    *) bad "unknown argument '$1' (see --help)" ;;
  esac
  shift
done
if [ -n "$gpu_arches" ] && ! [[ $gpu_arches =~ ^[0-9]+\.[0-9](\+PTX)?([\;\ ][0-9]+\.[0-9](\+PTX)?)*$ ]]; then
  bad "--gpu takes compute capabilities as TORCH_CUDA_ARCH_LIST does (e.g. 9.0 or '8.6;9.0'), not '$gpu_arches'"
fi

for tool in podman podman-compose curl python3; do
  command -v "$tool" >/dev/null || bad "$tool is not installed (podman: apt-get install podman; podman-compose: pip install podman-compose)"
done
if [ "$local_bases" = 1 ]; then
  command -v mmdebstrap >/dev/null || bad "--local-bases needs mmdebstrap (apt-get install mmdebstrap)"
fi
if [ -n "$find_links" ]; then
  [ -d "$find_links" ] || bad "--pip-find-links $find_links is not a folder"
  find_links=$(cd "$find_links" && pwd)
fi
if [ -n "$wheelhouse" ]; then
  [ -d "$wheelhouse" ] || bad "the mmcv wheelhouse $wheelhouse is not a folder (--mmcv-wheelhouse or DETTUNE_WHEELHOUSE)"
  wheelhouse=$(cd "$wheelhouse" && pwd)
  compgen -G "$wheelhouse/mmcv-2.1.0-cp311-*.whl" >/dev/null \
    || bad "no mmcv-2.1.0-cp311-*.whl in $wheelhouse: give a folder holding one, or none to compile mmcv (~11 min)"
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/dettune-smoke.XXXXXX")
logs=${logs:-$work/logs}
mkdir -p "$logs"
logs=$(cd "$logs" && pwd)
project=dettune-smoke-$(basename "$work" | cut -d. -f2 | tr '[:upper:]' '[:lower:]')
# the one-off containers this run may start (run_named), by their names of this run only
named_containers=("$project-synth" "$project-local-search")
for n in client client-2 client-3 client-4; do named_containers+=("$project-$n"); done
compose_up=0
timings=()

if [ "$runc" = 1 ]; then
  printf '[containers]\ndefault_ulimits = []\n\n[engine]\nruntime = "runc"\ncgroup_manager = "cgroupfs"\n' \
    >"$work/containers.conf"
  export CONTAINERS_CONF=$work/containers.conf
fi

compose_files=(-f "$DOCKER/compose.yaml")
if [ "$local_bases" = 1 ]; then compose_files+=(-f "$DOCKER/smoke/compose.local.yaml"); fi
compose() {
  podman-compose --project-name "$project" --env-file "$work/env" "${compose_files[@]}" "$@"
}

say() { echo "[smoke $(date -u +%H:%M:%S)] $*"; }

# step [--show] NAME COMMAND...: runs COMMAND (in a subshell, errexit on) with its output in $logs/NN-NAME.log and
# prints how long it took, and with --show the log; on failure the log's last lines, then the script stops (and
# cleans up).
step() {
  local show=0 name start status log
  if [ "$1" = --show ]; then show=1; shift; fi
  name=$1
  shift
  log=$logs/$(printf '%02d' $((${#timings[@]} + 1)))-$name.log
  say "$name ..."
  start=$(date +%s)
  set +e
  (set -e; "$@") >"$log" 2>&1
  status=$?
  set -e
  timings+=("$(printf '%-22s %5d s  %s' "$name" $(($(date +%s) - start)) "$([ $status = 0 ] && echo ok || echo "FAILED ($status)")")")
  if [ $status != 0 ]; then
    say "$name FAILED (exit $status) after $(($(date +%s) - start)) s; the end of $log:"
    tail -n 40 "$log" | sed 's/^/    /'
    exit 1
  fi
  if [ $show = 1 ]; then sed 's/^/    /' "$log"; fi
  say "$name: $(($(date +%s) - start)) s"
}

cleanup() {
  local status=$?
  set +e
  if [ "$compose_up" = 1 ]; then
    say "cleanup: compose down -v (project $project: its containers, networks and volumes)"
    compose down -v >"$logs/cleanup.log" 2>&1
  fi
  for name in "${named_containers[@]}"; do podman rm -f --ignore "$name" >/dev/null 2>&1; done
  local left
  left=$(podman ps -a --filter "label=io.podman.compose.project=$project" --format '{{.Names}}'; \
         podman volume ls --filter "label=io.podman.compose.project=$project" --format '{{.Name}}'; \
         podman network ls --format '{{.Name}}' | grep "^${project}_")
  [ -n "$left" ] && say "cleanup: left behind (remove by hand): $left"
  find "$work" -mindepth 1 -maxdepth 1 ! -path "$logs" -exec rm -rf {} +
  [ "$logs" = "$work/logs" ] || rmdir "$work" 2>/dev/null
  echo
  echo "step                    took    result"
  printf '%s\n' "${timings[@]}"
  say "logs: $logs"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ------------------------------------------------------------------------------------------------- the images
build_local_python_base() {
  if podman image exists "$LOCAL_PYTHON_IMAGE" && [ "$rebuild_bases" = 0 ] \
      && podman run --rm --network none "$LOCAL_PYTHON_IMAGE" test -f /usr/include/python3.11/Python.h; then
    echo "$LOCAL_PYTHON_IMAGE exists: reused (--rebuild-bases makes it anew)"
    return 0
  fi
  # the hooks' $1 is mmdebstrap's target root, expanded by mmdebstrap's shell
  # shellcheck disable=SC2016
  local hooks=(--customize-hook='ln -sf /usr/bin/python3 "$1/usr/local/bin/python"')
  if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    # shellcheck disable=SC2016
    hooks+=(--customize-hook='copy-in /usr/local/share/ca-certificates /usr/local/share'
            --customize-hook='chroot "$1" update-ca-certificates')
  fi
  # python3-dev: the public python image carries Python.h, which compiling mmcv's ops needs
  mmdebstrap --variant=minbase --include=python3,python3-venv,python3-pip,python3-dev,ca-certificates "${hooks[@]}" \
    bookworm "$work/python-base.tar"
  podman import "$work/python-base.tar" "$LOCAL_PYTHON_IMAGE"
  rm -f "$work/python-base.tar"
}

build_local_postgres() {
  podman build --network host --build-arg BASE_IMAGE="$LOCAL_PYTHON_IMAGE" -t "$LOCAL_POSTGRES_IMAGE" \
    -f "$DOCKER/smoke/postgres.Containerfile" "$DOCKER/smoke"
}

build_target() {
  local target=$1
  local args=(--network host -f "$DOCKER/Dockerfile" --ignorefile "$DOCKER/Dockerfile.dockerignore"
                        --target "$target" -t "$IMAGE:$VERSION-$target")
  [ -n "$python_image" ] && args+=(--build-arg "PYTHON_IMAGE=$python_image")
  if [ "$target" = gpu ]; then
    # no find-links: a CPU torch 2.13.0+cpu there would satisfy torch==2.13.0 and win over PyPI's CUDA build
    args+=(--build-arg "TORCH_CUDA_ARCH_LIST=$gpu_arches" --build-arg "MAX_JOBS=$(nproc)")
    podman build "${args[@]}" "$REPO"
    return
  fi
  [ -n "$torch_index" ] && args+=(--build-arg "TORCH_CPU_INDEX_URL=$torch_index")
  if [ -n "$find_links" ]; then
    printf '[global]\nfind-links = %s\n' "$find_links" >"$work/pip.conf"
    args+=(--volume "$work/pip.conf:/etc/pip.conf:ro" --volume "$find_links:$find_links:ro")
  fi
  if [ -n "$wheelhouse" ]; then
    args+=(--volume "$wheelhouse:/mmcv-wheelhouse:ro" --build-arg MMCV_WHEELHOUSE=/mmcv-wheelhouse)
  fi
  podman build "${args[@]}" "$REPO"
}

# In the gpu image, without a GPU: torch is the CUDA build, mmcv's compiled ops carry CUDA code (a fatbin section,
# linked to the CUDA runtime) and load with that torch (one op run on the CPU), and dettune's CLI imports.
gpu_imports() {
  podman run --rm --network none "$IMAGE:$VERSION-gpu" python -c '
import mmcv, mmcv.ops, search.cli, torch
from mmcv.utils import ext_loader

ext = ext_loader.load_ext("_ext", ["nms"])
code = open(ext.__file__, "rb").read()
print("torch", torch.__version__, "CUDA", torch.version.cuda, "GPU present:", torch.cuda.is_available())
print("mmcv", mmcv.__version__, ext.__file__, f"{len(code) / 2**20:.0f} MiB")
assert torch.version.cuda, "torch is not the CUDA build"
assert b".nv_fatbin" in code and b"libcudart.so" in code, "mmcv ops hold no CUDA code"
boxes = torch.tensor([[0.0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]])
kept = mmcv.ops.nms(boxes, torch.tensor([0.9, 0.8, 0.7]), 0.5)[1].tolist()
assert kept == [0, 2], kept
print("mmcv.ops.nms on the CPU:", kept, "- mmcv.ops and search.cli import")
'
}

# ------------------------------------------------------------------------------------------------- in the image
# one-off containers get names of this run, so cleanup removes exactly them
run_named() {
  local name=$project-$1
  shift
  podman run --rm --name "$name" "$@"
}

synth_data() {
  mkdir -p "$work/data"
  run_named synth --network none --user 0:0 -v "$work/data:/data" "$IMAGE:$VERSION-cpu" \
    dettune data synth /data/synth --images 48
  chmod -R a+rX "$work/data"
}

search_in_image() {
  run_named local-search --network none --shm-size 1g \
    -v "$REPO/spaces:/home/ray/spaces:ro" -v "$work/data:/home/ray/data:ro" "$IMAGE:$VERSION-cpu" \
    bash -c 'set -e; dettune validate spaces/demo.yaml
             dettune search spaces/demo.yaml --name smoke-local --trials 2 --epochs 2'
}

# ------------------------------------------------------------------------------------------------- the cluster
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

write_env() {
  secret() { python3 -c 'import secrets; print(secrets.token_hex(32))'; }
  ray_port=$(free_port)
  mlflow_port=$(free_port)
  ray_token=$(secret)
  mlflow_password=$(secret)
  (
    umask 077
    cat >"$work/env" <<ENV
COMPOSE_PROJECT_NAME=$project
COMPOSE_PROFILES=cpu
DETTUNE_FLAVOR=cpu
DETTUNE_IMAGE=$IMAGE
DETTUNE_VERSION=$VERSION
DETTUNE_BIND_ADDRESS=127.0.0.1
RAY_DASHBOARD_PORT=$ray_port
MLFLOW_PORT=$mlflow_port
DETTUNE_DATA=$work/data
RAY_AUTH_TOKEN=$ray_token
RAY_SHM_SIZE=1gb
MLFLOW_AUTH_ADMIN_USERNAME=admin
MLFLOW_AUTH_ADMIN_PASSWORD=$mlflow_password
MLFLOW_FLASK_SERVER_SECRET_KEY=$(secret)
MLFLOW_TRACKING_USERNAME=admin
MLFLOW_TRACKING_PASSWORD=$mlflow_password
POSTGRES_PASSWORD=$(secret)
MINIO_ROOT_PASSWORD=$(secret)
ENV
    if [ "$local_bases" = 1 ]; then echo "POSTGRES_IMAGE=$LOCAL_POSTGRES_IMAGE"; fi >>"$work/env"
  )
}

container_of() {
  podman ps -a --filter "label=io.podman.compose.project=$project" \
    --filter "label=io.podman.compose.service=$1" --format '{{.Names}}' | head -n 1
}

# wait_healthy SERVICE... : each service's own compose health check passes (run by hand: podman 4.x without systemd
# runs no health-check timers, and podman-compose before podman 4.6 ignores `condition: service_healthy`)
wait_healthy() {
  local service ctr deadline
  for service in "$@"; do
    deadline=$(($(date +%s) + 300))
    until ctr=$(container_of "$service") && [ -n "$ctr" ] && podman healthcheck run "$ctr" >/dev/null 2>&1; do
      if [ "$(date +%s)" -ge "$deadline" ]; then
        echo "$service: not healthy after 300 s; its log:"
        [ -n "$ctr" ] && podman logs --tail 60 "$ctr"
        return 1
      fi
      sleep 5
    done
    echo "$service ($ctr): healthy"
  done
}

# up_and_healthy LOG: compose up (podman-compose's own output, much of it podman 4.x complaining that it has no
# systemd for health-check timers, goes to LOG), then every service healthy and both Ray nodes in the cluster
up_and_healthy() {
  compose up -d --no-build >"$1" 2>&1 || { cat "$1"; return 1; }
  wait_healthy postgres mlflow ray-head ray-worker-cpu
  local deadline=$(($(date +%s) + 120))
  until podman exec "$(container_of ray-head)" ray status >"$work/ray-status.txt" 2>&1 \
      && [ "$(grep -c ' node_' "$work/ray-status.txt")" = 2 ]; do
    [ "$(date +%s)" -lt "$deadline" ] || { cat "$work/ray-status.txt"; echo "the worker did not join"; return 1; }
    sleep 5
  done
  sed -n '/Active:/,/Pending:/p' "$work/ray-status.txt" | grep -v Pending
}

compose_up_cluster() {
  up_and_healthy "$logs/podman-compose-up.log"
  # every published port is on the loopback address
  local ports
  ports=$(podman ps --filter "label=io.podman.compose.project=$project" --format '{{.Names}} {{.Ports}}')
  echo "$ports"
  if echo "$ports" | grep -oE '[^ ,]+->[0-9]+' | grep -v '^127\.0\.0\.1:'; then
    echo "published beyond 127.0.0.1 (above)"
    return 1
  fi
}

http_status() {  # http_status URL [CURL_ARGS...]
  local url=$1
  shift
  curl -sS -o /dev/null -w '%{http_code}' "$@" "$url"
}

job_api_needs_token() {
  local code
  code=$(http_status "http://127.0.0.1:$ray_port/api/jobs/")
  echo "job API without the token: HTTP $code"
  [ "$code" = 401 ] || [ "$code" = 403 ]
  code=$(http_status "http://127.0.0.1:$ray_port/api/jobs/" -H "Authorization: Bearer $ray_token")
  echo "job API with the token: HTTP $code"
  [ "$code" = 200 ]
}

# ray_job NAME SUBCOMMAND ARGS...: `ray job SUBCOMMAND --address ... ARGS` from a client container (named NAME) on
# the host's network, with the token and the checkout
ray_job() {
  local name=$1 subcommand=$2
  shift 2
  run_named "$name" --network host -e RAY_AUTH_MODE=token -e RAY_AUTH_TOKEN="$ray_token" \
    -v "$REPO:/src:ro" -w /src "$IMAGE:$VERSION-cpu" \
    ray job "$subcommand" --address "http://127.0.0.1:$ray_port" "$@"
}

submit_search() {
  ray_job client submit --working-dir . -- \
    python -m search search spaces/demo.yaml --name "$SEARCH" --trials 2 --epochs 2 \
    --data-root /data/datasets/synth --storage /data/runs --tracking-uri http://mlflow:5000
}

job_api() {  # job_api METHOD PATH: the job REST API with the token
  curl -sS --fail -X "$1" -H "Authorization: Bearer $ray_token" "http://127.0.0.1:$ray_port/api/jobs/$2"
}

# A second search, stopped (`ray job stop`) once a trial has finished its first of 3 epochs: resumed after down/up.
start_and_stop_search() {
  ray_job client-2 submit --no-wait --submission-id "$project-resume" --working-dir . -- \
    python -m search search spaces/demo.yaml --name "$RESUMED" --trials 2 --epochs 3 \
    --data-root /data/datasets/synth --storage /data/runs --tracking-uri http://mlflow:5000 >"$logs/ray-job-2.log" 2>&1 \
    || { cat "$logs/ray-job-2.log"; return 1; }
  echo "submitted $project-resume"
  local deadline=$(($(date +%s) + 600))
  until job_api GET "$project-resume/logs" | grep -q 'epoch 1/3'; do
    [ "$(date +%s)" -lt "$deadline" ] || { echo "no epoch finished in 600 s"; job_api GET "$project-resume/logs"; return 1; }
    sleep 3
  done
  ray_job client-3 stop "$project-resume" >>"$logs/ray-job-2.log" 2>&1 || { cat "$logs/ray-job-2.log"; return 1; }
  echo "ray job stop $project-resume; the search's events until then:"
  job_api GET "$project-resume/logs" | python3 -c 'import json, sys; print(json.load(sys.stdin)["logs"])' \
    | grep -E '^\[[0-9:]+\] trial' || true
  job_api GET "$project-resume" | python3 -c 'import json, sys; print("job status:", json.load(sys.stdin)["status"])' \
    | tee "$work/stopped.txt"
  grep -q STOPPED "$work/stopped.txt"
}

resume_search() {
  ray_job client-4 submit --working-dir . -- \
    python -m search resume "$RESUMED" --storage /data/runs --tracking-uri http://mlflow:5000 >"$logs/ray-job-3.log" 2>&1 \
    || { cat "$logs/ray-job-3.log"; return 1; }
  echo "ray job submit ... python -m search resume $RESUMED: the job's events and table"
  grep -E "^\[[0-9:]+\] trial|^trial |^$RESUMED-[0-9]|Job '.*' (succeeded|failed)" "$logs/ray-job-3.log" || true
  mlflow_runs "$RESUMED" "$work/resumed.txt"
  # the parent and both trials finished, each trial completed or stopped by ASHA, none twice
  [ "$(grep -c . "$work/resumed.txt")" = 3 ] || { echo "expected 3 runs (parent + 2 trials)"; return 1; }
  [ "$(grep -c ' FINISHED ' "$work/resumed.txt")" = 3 ] || { echo "a run is not FINISHED"; return 1; }
  [ "$(grep -cE ' FINISHED (completed|stopped) ' "$work/resumed.txt")" = 2 ]
}

# mlflow_runs SEARCH FILE: the search's runs, read through MLflow's REST API with the password, as "run_id name status" lines
mlflow_runs() {
  local search=$1 file=$2 api=http://127.0.0.1:$mlflow_port/api/2.0/mlflow code
  code=$(http_status "$api/experiments/get-by-name?experiment_name=$search")
  echo "REST API without the password: HTTP $code"
  [ "$code" = 401 ] || return 1
  code=$(http_status "$api/experiments/get-by-name?experiment_name=$search" -u "admin:wrong-$mlflow_password")
  echo "REST API with a wrong password: HTTP $code"
  [ "$code" = 401 ] || return 1
  MLFLOW_API=$api MLFLOW_USER=admin MLFLOW_PASSWORD=$mlflow_password SEARCH=$search python3 - >"$file" <<'PY'
import base64, json, os, urllib.request

api, search = os.environ["MLFLOW_API"], os.environ["SEARCH"]
auth = base64.b64encode(f"{os.environ['MLFLOW_USER']}:{os.environ['MLFLOW_PASSWORD']}".encode()).decode()

def call(path, body=None):
    request = urllib.request.Request(f"{api}/{path}", headers={"Authorization": f"Basic {auth}",
                                                                 "Content-Type": "application/json"},
                                     data=None if body is None else json.dumps(body).encode())
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)

experiment = call(f"experiments/get-by-name?experiment_name={search}")["experiment"]
runs = call("runs/search", {"experiment_ids": [experiment["experiment_id"]], "max_results": 100}).get("runs", [])
for run in sorted(runs, key=lambda r: r["info"]["run_name"]):
    info, data = run["info"], run.get("data", {})
    metrics = {m["key"]: m["value"] for m in data.get("metrics", [])}
    tags = {t["key"]: t["value"] for t in data.get("tags", [])}
    print(info["run_id"], info["run_name"], info["status"], tags.get("dettune.status", "-"),
          "val/bbox_mAP=%s" % metrics.get("val/bbox_mAP", "-"))
PY
  echo "$search, read back with the password:"
  cat "$file"
}

check_runs() {
  mlflow_runs "$SEARCH" "$work/runs-1.txt"
  # the parent run and one run per trial
  [ "$(grep -c . "$work/runs-1.txt")" = 3 ] || { echo "expected 3 runs (parent + 2 trials)"; return 1; }
  grep -q "^[0-9a-f]* $SEARCH-1 FINISHED" "$work/runs-1.txt" && grep -q "^[0-9a-f]* $SEARCH-2 FINISHED" "$work/runs-1.txt"
  echo "in PostgreSQL:"
  podman exec "$(container_of postgres)" psql --username mlflow --dbname mlflow -tA \
    -c "SELECT count(*) FROM runs JOIN experiments USING (experiment_id) WHERE experiments.name = '$SEARCH'" \
    | tee "$work/pg-count.txt"
  [ "$(tr -d '[:space:]' <"$work/pg-count.txt")" = 3 ]
}

down_up_keeps_runs() {
  compose down >"$logs/podman-compose-down.log" 2>&1 || { cat "$logs/podman-compose-down.log"; return 1; }
  echo "compose down: $(podman ps -a --filter "label=io.podman.compose.project=$project" -q | wc -l) containers left"
  up_and_healthy "$logs/podman-compose-up-again.log"
  mlflow_runs "$SEARCH" "$work/runs-2.txt"
  diff "$work/runs-1.txt" "$work/runs-2.txt" && echo "the same runs after down/up"
}

# ------------------------------------------------------------------------------------------------- the run
say "project $project, logs in $logs"
if [ "$local_bases" = 1 ]; then
  step --show python-base build_local_python_base
  step postgres-image build_local_postgres
  python_image=${python_image:-$LOCAL_PYTHON_IMAGE}
fi
say "python base: ${python_image:-$PYTHON_BASE_DEFAULT (the Dockerfile default)}"
say "torch index: ${torch_index:-the Dockerfile default}; pip find-links: ${find_links:-none}"
if [ -n "$wheelhouse" ]; then say "mmcv: the wheel in $wheelhouse"; else say "mmcv: compiled in the build"; fi
step build-cpu build_target cpu
step build-mlflow build_target mlflow
if [ -n "$gpu_arches" ]; then
  step build-gpu build_target gpu
  step --show gpu-image-imports gpu_imports
fi
step synth-data synth_data
step validate-and-search search_in_image
write_env
compose_up=1
step --show compose-up compose_up_cluster
step --show job-api-needs-token job_api_needs_token
step ray-job-submit submit_search
step --show mlflow-read-back check_runs
step --show search-stopped-midway start_and_stop_search
step --show down-up-keeps-runs down_up_keeps_runs
step --show resume-after-restart resume_search
say "all steps passed"
