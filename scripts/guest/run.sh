#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# Runs vfio-mig's guest tests against the kernel's mtty sample mdev in a QEMU guest, and against
# the igb-vfio-pci variant driver on QEMU's emulated igb VFs in a third guest.
# Works on a bare Debian bookworm machine as root (with a Rust toolchain); idempotent; caches
# everything under scripts/guest/.work/. Boots two guests: the Debian kernel (devices opened
# through the VFIO container and groups) and a small kernel built here with iommufd (devices
# opened through /dev/iommu and /dev/vfio/devices/vfioN, then through groups again). Exit
# status 0 only when both guests printed "VFIO-MIG-GUEST: PASS" with a passing run for every
# backend. See docs/guest-tests.md.
#
# Steps (each a script of its own, runnable alone once the earlier ones have run):
#   packages.sh   apt: qemu-system-x86 (bookworm-backports), busybox-static, cpio, kmod, gcc, ...
#   kernel.sh     newest Linux 6.12 of bookworm-security, extracted (not installed); builds mtty.ko
#   ikernel.sh    the project's kernel: tinyconfig + iommufd-kernel.config from linux-source-6.12
#                 (iommufd run of mtty, and the igb guest; ~5 min once, then cached by version
#                 and fragment hash)
#   build.sh      static vfio-mig binary and guest test binary (target/guest)
#   initramfs.sh  busybox + modules + binaries + /init (init.sh)
#   boot.sh       QEMU (TCG unless KVM really works) under timeout; judges the marker line;
#                 `boot.sh debian` (backend group), then `boot.sh iommufd` (backends iommufd, group)
#   igb/*.sh      the third guest, from the fixture ../shared/igb-vfio (VFIO_MIG_IGB_FIXTURE):
#                 qemu.sh (patched QEMU, ~8 min once, cached by hash), driver.sh (igb-vfio-pci.ko
#                 against ikernel.sh's kernel), initramfs.sh, boot.sh (that kernel on q35 +
#                 intel-iommu + two igb PFs, judged by its marker)
#
# Knobs (environment):
#   VFIO_MIG_GUEST_SKIP_APT=1         no package step (manage packages yourself)
#   VFIO_MIG_GUEST_SKIP_BUILD=1       no cargo build; reuse the binaries of the previous run
#   VFIO_MIG_GUEST_IOMMUFD=0          no iommufd run (not a full pass; the kernel is still built
#                                     for the igb guest)
#   VFIO_MIG_SKIP_IGB=1               no igb guest (not a full pass)
#   VFIO_MIG_IGB_FIXTURE=<dir>        the igb-vfio fixture (default ../shared/igb-vfio)
#   VFIO_MIG_GUEST_TIMEOUT=600        seconds before QEMU is killed (the run fails)
#   VFIO_MIG_GUEST_ACCEL=auto         auto | tcg | kvm (auto: KVM only if it provably works)
#   VFIO_MIG_GUEST_TEST_ARGS=...      extra arguments of the test binary, e.g. a test name filter
#   VFIO_MIG_GUEST_RUST_LOG=...       RUST_LOG inside the guest
#   VFIO_MIG_GUEST_MDEVS=4            number of mtty mdevs created (type VFIO_MIG_GUEST_MDEV_TYPE,
#                                     default mtty-2)
#   VFIO_MIG_GUEST_KERNEL_ABI=...     pin a kernel ABI (e.g. 6.12.117+deb12)
#   VFIO_MIG_GUEST_KERNEL_REFRESH=1   look for a newer kernel than the cached one
#   VFIO_MIG_GUEST_WORK=<dir>         cache dir (default scripts/guest/.work)
#   VFIO_MIG_GUEST_TARGET_DIR=<dir>   cargo target dir of the static build (default target/guest)
#   VFIO_MIG_GUEST_MEM=1G, VFIO_MIG_GUEST_SMP=2, VFIO_MIG_GUEST_APPEND=...  QEMU/kernel tweaks
#   VFIO_MIG_IGB_SMP=1                vCPUs of the igb guest (1: the fixture's device model races under MTTCG)
# The console log of the last boot is $WORK/console.log (scripts/guest/.work/console.log).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=igb/lib.sh
source "$HERE/igb/lib.sh"

step() {
    local name=$1 t0=$SECONDS rc=0
    shift
    "$HERE/$name" "$@" || rc=$?
    log "step $name${*:+ $*}: $((SECONDS - t0))s$( ((rc == 0)) || echo " (failed, status $rc)")"
    return "$rc"
}

# One run at a time per cache dir (they share the initramfs tree and the console log).
exec 9>"$WORK/.lock"
if ! flock -n 9; then
    log "another run holds $WORK/.lock: waiting"
    flock 9
fi

t_start=$SECONDS
if igb_skipped; then
    log "VFIO_MIG_SKIP_IGB=1: no igb guest"
else
    # A checkout without the igb fixture fails here, before any long build.
    igb_check_fixture
fi
step packages.sh
step kernel.sh
step ikernel.sh
igb_skipped || step igb/qemu.sh
igb_skipped || step igb/driver.sh
step build.sh
step initramfs.sh
igb_skipped || step igb/initramfs.sh
rc=0
results=()
step boot.sh debian || rc=$?
results+=("debian kernel (group): $( ((rc == 0)) && echo PASS || echo FAIL)")
if ikernel_enabled; then
    rc2=0
    step boot.sh iommufd || rc2=$?
    results+=("iommufd kernel (iommufd, group): $( ((rc2 == 0)) && echo PASS || echo FAIL)")
    ((rc != 0)) || rc=$rc2
else
    results+=("iommufd kernel: SKIPPED (VFIO_MIG_GUEST_IOMMUFD=0): not a full pass")
fi
if igb_skipped; then
    results+=("igb guest: SKIPPED (VFIO_MIG_SKIP_IGB=1): not a full pass")
else
    rc3=0
    step igb/boot.sh || rc3=$?
    results+=("igb guest (igb-vfio-pci, group): $( ((rc3 == 0)) && echo PASS || echo FAIL)")
    ((rc != 0)) || rc=$rc3
fi
for r in "${results[@]}"; do
    log "guest: $r"
done
log "total: $((SECONDS - t_start))s"
exit "$rc"
