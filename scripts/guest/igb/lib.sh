# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Shared settings of the igb guest (the third guest: igb-vfio-pci on QEMU's emulated igb VFs).
# Sourced by the scripts of this folder, not run. See docs/guest-tests.md.
# shellcheck shell=bash disable=SC2034 # the variables are used by the scripts sourcing this

# shellcheck source-path=SCRIPTDIR source=../lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
IGB_DIR=$GUEST_DIR/igb

# The fixture lives outside the project, as the kernel packages do: ../shared/igb-vfio next to
# the checkout (CI has it there), or wherever VFIO_MIG_IGB_FIXTURE points.
IGB_FIXTURE=${VFIO_MIG_IGB_FIXTURE:-$REPO_ROOT/../shared/igb-vfio}
IGB_QEMU_PATCH=qemu/igb-migration-qemu-10.0.2.patch
IGB_FIXTURE_FILES=("$IGB_QEMU_PATCH" driver/main.c driver/Kbuild driver/Makefile driver/compat-6.12.patch)

# Everything of this guest goes under the harness's cache dir.
IGB_WORK=$WORK/igb
mkdir -p "$IGB_WORK"

# Fails with one line naming every fixture file that is missing.
igb_check_fixture() {
    local f missing=()
    [[ -d $IGB_FIXTURE ]] ||
        die "igb fixture: directory $IGB_FIXTURE is missing (set VFIO_MIG_IGB_FIXTURE=<dir of igb-vfio>, or VFIO_MIG_SKIP_IGB=1 to skip the igb guest: not a full pass)"
    for f in "${IGB_FIXTURE_FILES[@]}"; do
        [[ -f $IGB_FIXTURE/$f ]] || missing+=("$IGB_FIXTURE/$f")
    done
    ((${#missing[@]} == 0)) ||
        die "igb fixture: missing ${missing[*]} (set VFIO_MIG_IGB_FIXTURE, or VFIO_MIG_SKIP_IGB=1: not a full pass)"
}

# The project's kernel that the igb guest boots (ikernel.sh): its cache directory.
igb_kernel_dir() {
    [[ -s $WORK/ikernel/current ]] || die "igb: no guest kernel built yet: run scripts/guest/ikernel.sh"
    echo "$WORK/ikernel/$(cat "$WORK/ikernel/current")"
}

# The patched QEMU of the cache key (qemu.sh writes it; boot.sh runs it).
igb_qemu_binary() {
    [[ -s $IGB_WORK/qemu/current ]] || die "igb: no patched QEMU built yet: run scripts/guest/igb/qemu.sh"
    echo "$IGB_WORK/qemu/$(cat "$IGB_WORK/qemu/current")/qemu-system-x86_64"
}
