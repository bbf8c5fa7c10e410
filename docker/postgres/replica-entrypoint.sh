#!/bin/bash
# A streaming replica: cloned from the primary with pg_basebackup -R on
# first start, then the image's usual entrypoint runs postgres.
set -euo pipefail
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    until pg_isready -h "$PRIMARY_HOST" -p 5432 -q; do sleep 1; done
    export PGPASSWORD="$REPLICATION_PASSWORD"
    pg_basebackup -h "$PRIMARY_HOST" -U replicator -D "$PGDATA" -R -X stream -P
    chmod 700 "$PGDATA"
fi
exec docker-entrypoint.sh postgres
