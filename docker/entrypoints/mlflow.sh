#!/usr/bin/env bash
# MLflow tracking server with the basic-auth app: runs, params and metrics in PostgreSQL (POSTGRES_DB), users and
# permissions in PostgreSQL too (MLFLOW_AUTH_DB), artifacts proxied by the server to MLFLOW_ARTIFACTS_DESTINATION
# (s3://bucket/prefix on MinIO in compose), so clients need MLflow credentials only, never the store's.
#
# Environment: POSTGRES_HOST (postgres), POSTGRES_PORT (5432), POSTGRES_USER (mlflow), POSTGRES_PASSWORD (required),
# POSTGRES_DB (mlflow), MLFLOW_AUTH_DB (mlflow_auth), MLFLOW_AUTH_ADMIN_USERNAME (admin),
# MLFLOW_AUTH_ADMIN_PASSWORD (required; read by mlflow itself, used only to create the admin on first start),
# MLFLOW_FLASK_SERVER_SECRET_KEY (required), MLFLOW_AUTH_DEFAULT_PERMISSION (READ), MLFLOW_ARTIFACTS_DESTINATION
# (required), MLFLOW_HOST (0.0.0.0), MLFLOW_PORT (5000), MLFLOW_WORKERS (2); for S3: MLFLOW_S3_ENDPOINT_URL,
# AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY. Arguments are passed on to `mlflow server`.
# Secrets never reach the command line (where `ps` shows them): the store URIs travel in the environment and in a
# private auth config file.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$(dirname "$0")/common.sh"

require_secret POSTGRES_PASSWORD
require_secret MLFLOW_AUTH_ADMIN_PASSWORD 12  # mlflow's own minimum
require_secret MLFLOW_FLASK_SERVER_SECRET_KEY
if [ -z "${MLFLOW_ARTIFACTS_DESTINATION:-}" ]; then
  die "MLFLOW_ARTIFACTS_DESTINATION is not set: e.g. s3://mlflow/artifacts (with MLFLOW_S3_ENDPOINT_URL) or file:///srv/mlflow-artifacts"
fi
export MLFLOW_AUTH_ADMIN_USERNAME=${MLFLOW_AUTH_ADMIN_USERNAME:-admin}
# The server's GenAI job runner (LLM judges, scorers) is of no use to dettune: off unless asked for.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}

# postgresql+psycopg://USER:PASSWORD@HOST:PORT/DB with user and password URL-quoted; --ini doubles '%' for configparser.
pg_uri() {
  python - "$@" <<'PY'
import os, sys
from urllib.parse import quote

env = os.environ
uri = "postgresql+psycopg://{}:{}@{}:{}/{}".format(
    quote(env.get("POSTGRES_USER", "mlflow"), safe=""), quote(env["POSTGRES_PASSWORD"], safe=""),
    env.get("POSTGRES_HOST", "postgres"), env.get("POSTGRES_PORT", "5432"), quote(sys.argv[1], safe=""))
print(uri.replace("%", "%%") if "--ini" in sys.argv[2:] else uri)
PY
}

MLFLOW_BACKEND_STORE_URI=$(pg_uri "${POSTGRES_DB:-mlflow}")
export MLFLOW_BACKEND_STORE_URI

auth_dir=$(mktemp -d "${TMPDIR:-/tmp}/mlflow-auth.XXXXXX")
chmod 700 "$auth_dir"
(
  umask 077
  cat >"$auth_dir/basic_auth.ini" <<INI
[mlflow]
default_permission = ${MLFLOW_AUTH_DEFAULT_PERMISSION:-READ}
database_uri = $(pg_uri "${MLFLOW_AUTH_DB:-mlflow_auth}" --ini)
admin_username = ${MLFLOW_AUTH_ADMIN_USERNAME}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI
)
export MLFLOW_AUTH_CONFIG_PATH=$auth_dir/basic_auth.ini

exec mlflow server --app-name basic-auth \
  --host "${MLFLOW_HOST:-0.0.0.0}" --port "${MLFLOW_PORT:-5000}" --workers "${MLFLOW_WORKERS:-2}" \
  --serve-artifacts --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION" \
  "$@"
