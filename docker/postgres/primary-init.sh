#!/bin/bash
# Runs once, when the primary's data directory is first made (the postgres
# image's /docker-entrypoint-initdb.d): the roles tidepool and the replicas
# log in as, and streaming replication from the compose network.
set -euo pipefail
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" <<SQL
create role replicator with replication login password '${REPLICATION_PASSWORD}';
create role app login password '${APP_PASSWORD}';
grant create on schema public to app;
SQL
cat >> "$PGDATA/postgresql.conf" <<CONF
wal_level = replica
max_wal_senders = 10
hot_standby = on
wal_log_hints = on
password_encryption = scram-sha-256
CONF
echo "host replication replicator all scram-sha-256" >> "$PGDATA/pg_hba.conf"
