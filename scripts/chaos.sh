#!/usr/bin/env bash
# The chaos run (benches/chaos.rs): faults injected under load through two
# tidepool processes, against a real 3-node cluster and a real etcd; prints
# the table of faults and outcomes and writes it to target/chaos.md.
# Needs what scripts/test.sh installs (PostgreSQL 15 server, etcd-server) and
# prlimit (util-linux) to allow 10,000 client connections.
set -euo pipefail
cd "$(dirname "$0")/.."
export TIDEPOOL_TMPDIR="${TIDEPOOL_TMPDIR:-/dev/shm}"
exec cargo bench --bench chaos "$@"
