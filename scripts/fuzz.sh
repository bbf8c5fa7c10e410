#!/usr/bin/env bash
# Runs each fuzz target for a bounded time and prints its executions and
# crashes. Not part of scripts/test.sh or CI's default run: it needs the
# nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`).
#
#   scripts/fuzz.sh [seconds-per-target] [target...]    default: 60 s, every target
#
# Each target starts from fuzz/corpus/<target> and writes what it discovers
# to fuzz/work/<target> (not committed). FUZZ_MERGE=1 afterwards merges the
# inputs that add coverage into fuzz/corpus/<target>. A crash is saved under
# fuzz/artifacts/<target>/; once fixed, its reproducer belongs in
# fuzz/regressions/<target>/, which tests/fuzz_regressions.rs replays on stable.
set -uo pipefail
cd "$(dirname "$0")/../fuzz"

seconds=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(frontend_messages startup_packet scram_exchange classify)

# Safe Rust needs no AddressSanitizer; without it the targets run several times faster.
cargo +nightly fuzz build --sanitizer none || exit 1

status=0
summary=()
for t in "${targets[@]}"; do
    mkdir -p "work/$t" "artifacts/$t"
    before=$(ls "artifacts/$t")
    log="work/$t.log"
    max_len=4096
    # Startup packets may be up to 10,000 bytes.
    [ "$t" = startup_packet ] && max_len=10240
    cargo +nightly fuzz run --sanitizer none "$t" "work/$t" "corpus/$t" -- \
        -max_total_time="$seconds" -max_len="$max_len" -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1 -artifact_prefix="artifacts/$t/" >"$log" 2>&1
    code=$?
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    [ -n "$execs" ] || execs=$(grep -o '^#[0-9]*' "$log" | tail -1 | tr -d '#')
    new=$(comm -13 <(echo "$before") <(ls "artifacts/$t") | sed '/^$/d')
    crashes=$(echo -n "$new" | grep -c . || true)
    if [ "$code" -ne 0 ] && [ "$crashes" -eq 0 ]; then
        echo "$t: libFuzzer failed (exit $code), see fuzz/$log" >&2
        status=1
    fi
    if [ "$crashes" -gt 0 ]; then
        status=1
        grep -m1 -E 'panicked at|ERROR: libFuzzer' "$log" >&2 || true
        sed "s|^|  fuzz/artifacts/$t/|" <<<"$new" >&2
    fi
    if [ "${FUZZ_MERGE:-0}" = 1 ]; then
        cargo +nightly fuzz run --sanitizer none "$t" "corpus/$t" "work/$t" -- -merge=1 >/dev/null 2>&1
    fi
    summary+=("$(printf '%-18s %4ss %12s executions %3s crashes' "$t" "$seconds" "${execs:-?}" "$crashes")")
done
printf '%s\n' "${summary[@]}"
exit $status
