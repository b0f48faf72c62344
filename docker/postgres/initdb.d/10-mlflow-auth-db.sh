#!/usr/bin/env bash
# Run once by the postgres image on an empty data volume (after it created POSTGRES_USER and POSTGRES_DB):
# a second database for MLflow's users and permissions, owned by the same role.
set -euo pipefail
auth_db=${MLFLOW_AUTH_DB:-mlflow_auth}
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
  --set=auth_db="$auth_db" --set=owner="$POSTGRES_USER" <<'SQL'
SELECT format('CREATE DATABASE %I OWNER %I', :'auth_db', :'owner')
WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'auth_db')\gexec
SQL
