#!/bin/sh
# A rejoin hook (`[coordinator] rejoin_command`) for the local clusters of
# src/demo/cluster.rs: turns a fenced former primary into a streaming replica
# of the new primary. The proxy only knows the node's address, so the data
# dir is found by port in the cluster's directory, where every node keeps
# its own port in <dir>/<node>/tidepool-node.conf.
#
#   rejoin.sh CLUSTER_DIR PG_BIN HOST PORT PRIMARY_HOST PRIMARY_PORT
#
# The cluster writes this script into CLUSTER_DIR and hands out the template
# (`Cluster::rejoin_command`), e.g.
#   sh /tmp/tp-x/rejoin.sh /tmp/tp-x /usr/lib/postgresql/15/bin {host} {port} {primary_host} {primary_port}
#
# Steps: stop the node if it runs, pg_rewind it from the new primary (the
# cluster runs with wal_log_hints and full_page_writes, which pg_rewind
# needs), write standby.signal and primary_conninfo, start it with pg_ctl.
set -eu
cd "$(dirname "$0")"

if [ $# -ne 6 ]; then
    echo "usage: $0 CLUSTER_DIR PG_BIN HOST PORT PRIMARY_HOST PRIMARY_PORT" >&2
    exit 2
fi
dir=$1 bin=$2 host=$3 port=$4 primary_host=$5 primary_port=$6
user=${TIDEPOOL_REJOIN_USER:-postgres}
pgpass="$dir/pgpass"

conf=$(grep -lx "port = $port" "$dir"/*/tidepool-node.conf 2>/dev/null | head -n 1 || true)
if [ -z "$conf" ]; then
    echo "rejoin: no node of $dir listens on port $port ($host)" >&2
    exit 1
fi
data=$(dirname "$conf")
name=$(basename "$data")
log="$dir/$name.log"

# PostgreSQL refuses to run as root: act as the data dir's owner.
uid=$(stat -c %u "$data")
gid=$(stat -c %g "$data")
as_owner() {
    if [ "$(id -u)" -eq 0 ] && [ "$uid" -ne 0 ]; then
        setpriv --reuid="$uid" --regid="$gid" --clear-groups -- "$@"
    else
        "$@"
    fi
}

echo "rejoin: $name ($host:$port) follows $primary_host:$primary_port" >&2
if as_owner "$bin/pg_ctl" status -D "$data" >/dev/null 2>&1; then
    as_owner "$bin/pg_ctl" stop -D "$data" -m fast -w -t 60 >&2
fi

# A just-promoted source records its new timeline in pg_control only at its
# next checkpoint; before that pg_rewind sees one timeline and rewinds nothing.
as_owner env PGPASSFILE="$pgpass" "$bin/psql" -X -q -w -h "$primary_host" -p "$primary_port" \
    -U "$user" -d postgres -c checkpoint >&2

# pg_rewind copies the source's configuration files too: keep the node's own.
saved="$dir/$name.node.conf"
cp "$data/tidepool-node.conf" "$saved"
as_owner env PGPASSFILE="$pgpass" "$bin/pg_rewind" --no-sync -D "$data" \
    --source-server="host=$primary_host port=$primary_port user=$user dbname=postgres" >&2
cp "$saved" "$data/tidepool-node.conf"
rm -f "$saved"

conninfo="host=$primary_host port=$primary_port user=$user passfile=$pgpass application_name=$name"
as_owner sh -c "touch '$data/standby.signal' && echo \"primary_conninfo = '$conninfo'\" >> '$data/postgresql.auto.conf'"
as_owner "$bin/pg_ctl" start -D "$data" -l "$log" -w -t 120 >&2
echo "rejoin: $name streams from $primary_host:$primary_port" >&2
