# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Shared settings and helpers of the guest harness. Sourced by the other scripts, not run.
# shellcheck shell=bash disable=SC2034 # the variables are used by the scripts sourcing this

GUEST_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$GUEST_DIR/../.." && pwd)
WORK=${VFIO_MIG_GUEST_WORK:-$GUEST_DIR/.work}
TARGET_TRIPLE=x86_64-unknown-linux-gnu
# Separate target dir: the static (crt-static) build must not invalidate the host build cache.
GUEST_TARGET_DIR=${VFIO_MIG_GUEST_TARGET_DIR:-$REPO_ROOT/target/guest}

mkdir -p "$WORK"

log() { printf '[guest %s] %s\n' "$(date +%T)" "$*" >&2; }
die() {
    printf '[guest %s] ERROR: %s\n' "$(date +%T)" "$*" >&2
    exit 1
}

# The kernel ABI chosen by kernel.sh (e.g. 6.12.117+deb12), recorded for the later steps.
current_abi() {
    [[ -s $WORK/kernel/current ]] || die "no kernel prepared yet: run scripts/guest/kernel.sh (or run.sh)"
    cat "$WORK/kernel/current"
}
