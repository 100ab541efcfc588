#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# Runs every cargo-fuzz target of fuzz/ for a bounded time: the stream decoder
# (stream_reader), stream::verify (stream_verify) and the handshake decoder
# (handshake_message).
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]     default: 60 seconds each, every target
#
# Installs cargo-fuzz and a nightly toolchain if missing. The corpus grows in
# fuzz/corpus/TARGET (seeded from fuzz/seeds/TARGET); a crash is saved in
# fuzz/artifacts/TARGET and fails the script (exit 1); a build failure exits 2. The summary
# of each run (executions, coverage, corpus) is printed.
set -euo pipefail
cd "$(dirname "$0")/.."

secs="${1:-60}"
shift || true

if ! command -v cargo-fuzz >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked || cargo install cargo-fuzz
fi
if ! rustup toolchain list | grep -q '^nightly'; then
    rustup toolchain install nightly --profile minimal
fi

targets=("$@")
if [ "${#targets[@]}" -eq 0 ]; then
    mapfile -t targets < <(cargo +nightly fuzz list --fuzz-dir fuzz)
fi

printf '\n==== build the fuzz targets\n'
mkdir -p fuzz/corpus
if ! cargo +nightly fuzz build --fuzz-dir fuzz >fuzz/corpus/build.log 2>&1; then
    grep -E '^error' -A8 fuzz/corpus/build.log | head -40
    echo "BUILD FAILED (fuzz/corpus/build.log): nothing was fuzzed"
    exit 2
fi

status=0
for t in "${targets[@]}"; do
    printf '\n==== fuzz %s for %s s\n' "$t" "$secs"
    mkdir -p "fuzz/corpus/$t"
    log="fuzz/corpus/$t.log"
    if cargo +nightly fuzz run --fuzz-dir fuzz "$t" "fuzz/corpus/$t" "fuzz/seeds/$t" -- \
        -max_total_time="$secs" -rss_limit_mb=2048 -max_len=65536 -print_final_stats=1 \
        >"$log" 2>&1; then
        grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | tail -1 || true
        grep -E 'stat::number_of_executed_units|stat::peak_rss_mb' "$log" || true
        echo "$t: no crash"
    else
        status=1
        tail -40 "$log"
        echo "$t: CRASH (see fuzz/artifacts/$t and $log)"
    fi
done
exit "$status"
