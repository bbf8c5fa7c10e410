#!/usr/bin/env bash
# Prepares target/tokio-postgres-suite/: tokio-postgres' own integration tests
# (tests/test of the crate version in Cargo.lock, as published on crates.io),
# built into one test binary for tests/tokio_postgres_suite.rs. Prints the
# binary's path on its last line.
#
# The suite is written for its own CI's server on port 5433 with trust auth
# for `postgres`; two edits make it runnable against any target and nothing
# else changes: every connection string or address naming 5433 takes the port
# from $TP_PORT at run time, and `user=postgres` gets `password=postgres`
# (tidepool authenticates every client). The bench target and its criterion
# dependency are dropped: they are not tests, and criterion is a long build.
#
# Idempotent: a second run rebuilds nothing and takes about a second.
set -euo pipefail
cd "$(dirname "$0")/.."

DIR="target/tokio-postgres-suite"
mkdir -p "$DIR"
exec 9>"$DIR/.lock"
flock 9

VERSION=$(awk '/^name = "tokio-postgres"$/ { getline; gsub(/[^0-9.]/, ""); print; exit }' Cargo.lock)
[ -n "$VERSION" ] || { echo "tokio-postgres is not in Cargo.lock" >&2; exit 1; }
SRC="$DIR/tokio-postgres-$VERSION"
# Which tests run: those of the type modules behind these features too.
FEATURES="with-bit-vec-0_6,with-chrono-0_4,with-eui48-1,with-geo-types-0_7,with-serde_json-1,with-time-0_3,with-uuid-1,with-jiff-0_2,with-smol_str-01,array-impls"

if [ ! -f "$SRC/.patched" ]; then
    registry="${CARGO_HOME:-$HOME/.cargo}/registry/src"
    crate=$(ls -d "$registry"/*/"tokio-postgres-$VERSION" 2>/dev/null | head -1 || true)
    if [ -z "$crate" ]; then
        cargo fetch -q
        crate=$(ls -d "$registry"/*/"tokio-postgres-$VERSION" | head -1)
    fi
    rm -rf "$SRC"
    cp -r "$crate" "$SRC"
    chmod -R u+w "$SRC"
    python3 - "$SRC" <<'EOF'
import pathlib, re, sys
src = pathlib.Path(sys.argv[1])
manifest = src / "Cargo.toml"
text = manifest.read_text()
text = re.sub(r'\[\[bench\]\]\n(?:[a-z]+ = .*\n)+', '', text)
text = re.sub(r'\[dev-dependencies\.criterion\]\n(?:[a-z-]+ = .*\n)+', '', text)
manifest.write_text(text + "\n[workspace]\n")
literal = re.compile(r'"((?:[^"\\]|\\.)*?5433(?:[^"\\]|\\.)*)"', re.S)
for path in (src / "tests" / "test").rglob("*.rs"):
    if path.name == "parse.rs":  # config parsing only, no server
        continue
    text = path.read_text()
    new = text.replace("user=postgres", "user=postgres password=postgres")
    new = literal.sub(lambda m: '&*crate::with_port("' + m.group(1) + '")', new)
    if path.name == "main.rs":
        new = new.replace(
            "mod binary_copy;",
            '/// Added by tidepool\'s scripts/tokio-postgres-suite.sh.\n'
            'fn with_port(s: &str) -> String {\n'
            '    s.replace("5433", &std::env::var("TP_PORT").expect("TP_PORT"))\n'
            '}\n\nmod binary_copy;',
            1,
        )
    path.write_text(new)
EOF
    touch "$SRC/.patched"
fi

# Its own target dir, kept between runs; the outer cargo's settings stay out.
binary=$(cd "$SRC" && env -u CARGO_TARGET_DIR -u CARGO_BUILD_TARGET_DIR -u RUSTFLAGS \
    CARGO_TARGET_DIR="$(cd ../ && pwd)/target" \
    cargo test -q --test test --features "$FEATURES" --no-run --message-format=json \
    | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "test":
        print(m["executable"])')
[ -x "$binary" ] || { echo "no test binary built" >&2; exit 1; }
echo "tokio-postgres-suite: $VERSION $binary"
