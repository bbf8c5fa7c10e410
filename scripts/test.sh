#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs what is missing, then runs
# fmt, clippy (warnings are errors) and every test against real clusters.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql-15)
command -v psql >/dev/null || missing+=(postgresql-client-15)
command -v pgbench >/dev/null || missing+=(postgresql-client-15)
command -v openssl >/dev/null || missing+=(openssl)
command -v etcd >/dev/null || missing+=(etcd-server)          # the HA tests start a real etcd
command -v protoc >/dev/null || missing+=(protobuf-compiler)  # etcd-client's build (scripts/protoc has a fallback)
command -v promtool >/dev/null || missing+=(prometheus)   # tests/metrics.rs lints /metrics with promtool
command -v docker-compose >/dev/null || missing+=(docker-compose)  # tests/docker_files.rs validates docker/compose.yaml (no engine needed)
python3 -c "import ensurepip, venv" 2>/dev/null || missing+=(python3 python3-venv)
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing: ${missing[*]}"
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -q
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
fi

cargo fmt --check
cargo clippy --all-targets -- -D warnings
scripts/psycopg2-suite.sh    # psycopg2's own test suite, run through tidepool by tests/psycopg2_suite.rs
scripts/tokio-postgres-suite.sh  # tokio-postgres' own tests, run through tidepool by tests/tokio_postgres_suite.rs
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --no-fail-fast
else
    cargo test --no-fail-fast
fi
