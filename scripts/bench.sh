#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# Runs `vfio-mig bench` (every suite, or those named) and writes a report a person can read:
#   target/bench-report/report.md    the table (also printed)
#   target/bench-report/report.json  every figure with its baseline, runs and notes
#   target/bench-report/report.png   the plot (python3 + matplotlib; installed with pip if
#                                     missing, skipped with a message if that fails)
#   target/bench-report/bench.log    the progress log
# With VFIO_MIG_BENCH_GUEST=1 it also boots the mtty guest (scripts/guest/run.sh, filtered to
# the bench test) and appends the per-transition figure (target 6) from the console log.
#
# Usage: scripts/bench.sh [vfio-mig bench options...]   e.g. --quick, --reps 9, --suite v2,v1
# Generated files are not committed; docs/benchmarks.md records the numbers of a run.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${VFIO_MIG_BENCH_OUT:-target/bench-report}
mkdir -p "$OUT"

cargo build --release -p vfio-mig-cli --bin vfio-mig
./target/release/vfio-mig bench --json --markdown "$OUT/report.md" "$@" \
    >"$OUT/report.json" 2> >(tee "$OUT/bench.log" >&2)

if [ "${VFIO_MIG_BENCH_GUEST:-0}" = 1 ]; then
    VFIO_MIG_GUEST_TEST_ARGS=bench_transition scripts/guest/run.sh >"$OUT/guest.log" 2>&1 || {
        echo "bench.sh: the guest run failed; see $OUT/guest.log" >&2
    }
    {
        echo
        echo "Target 6, in the QEMU guest on mtty (scripts/guest, console log):"
        echo
        grep -ho 'VFIO-MIG-BENCH: .*' "$OUT/guest.log" | sed 's/^/    /' || echo "    (no VFIO-MIG-BENCH line)"
    } >>"$OUT/report.md"
fi

if ! python3 -c 'import matplotlib' 2>/dev/null; then
    python3 -m pip install --quiet matplotlib 2>/dev/null ||
        python3 -m pip install --quiet --break-system-packages matplotlib 2>/dev/null || true
fi
if python3 -c 'import matplotlib' 2>/dev/null; then
    python3 scripts/bench_plot.py "$OUT/report.json" "$OUT/report.png"
    echo "bench.sh: plot in $OUT/report.png" >&2
else
    echo "bench.sh: no matplotlib (pip install matplotlib): no plot" >&2
fi
cat "$OUT/report.md"
echo "bench.sh: report in $OUT/report.md, $OUT/report.json" >&2
