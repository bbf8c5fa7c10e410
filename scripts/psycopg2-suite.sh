#!/usr/bin/env bash
# Prepares target/psycopg2-suite/: a Python venv with psycopg2-binary and the
# test suite from the matching psycopg2 source distribution on PyPI, for
# tests/psycopg2_suite.rs. Idempotent: each step is skipped when its result is
# already there, so a second run takes well under a second.
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION="${PSYCOPG2_VERSION:-2.9.13}"
DIR="target/psycopg2-suite"
VENV="$DIR/venv"
SRC="$DIR/psycopg2-$VERSION"
PYTHON="${PYTHON:-python3}"

mkdir -p "$DIR"
# Several tests may call this at once on a fresh checkout: one at a time.
exec 9>"$DIR/.lock"
flock 9

# 1. The venv with psycopg2-binary.
if [ ! -x "$VENV/bin/python" ]; then
    echo "creating venv $VENV"
    "$PYTHON" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import psycopg2, sys; sys.exit(psycopg2.__version__.split()[0] != '$VERSION')" 2>/dev/null; then
    echo "installing psycopg2-binary==$VERSION"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check "psycopg2-binary==$VERSION"
fi

# 2. The sdist, for its tests/ directory (the wheel does not ship them).
if [ ! -f "$SRC/tests/__init__.py" ]; then
    echo "downloading the psycopg2==$VERSION sdist"
    dl="$DIR/sdist"
    mkdir -p "$dl"
    if ! ls "$dl"/psycopg2-"$VERSION".tar.gz >/dev/null 2>&1; then
        "$VENV/bin/python" -m pip download -q --disable-pip-version-check \
            --no-binary :all: --no-deps -d "$dl" "psycopg2==$VERSION"
    fi
    rm -rf "$SRC"
    tar -xzf "$dl/psycopg2-$VERSION.tar.gz" -C "$DIR"
fi

# A stable name for the current version's tree.
ln -sfn "psycopg2-$VERSION" "$DIR/src"

echo "psycopg2-suite: python   $(cd "$VENV/bin" && pwd)/python ($("$VENV/bin/python" -c 'import psycopg2; print(psycopg2.__version__)'))"
echo "psycopg2-suite: tests    $(cd "$DIR/src/tests" && pwd)"
