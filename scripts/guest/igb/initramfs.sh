#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# Assembles $WORK/igb/initramfs.cpio for the igb guest: static busybox, /init (igb/init.sh),
# igb-vfio-pci.ko (driver.sh; vfio, vfio-pci-core and igb are built into the guest kernel of
# ikernel.sh), the static vfio-mig and the igb guest test binary (build.sh: vfio-mig-igb-tests,
# target guest_igb of vfio-mig-tests).
#
# Knobs:
#   VFIO_MIG_IGB_TEST_ARGS=...   extra arguments of the igb test binary (e.g. a name filter)
#   VFIO_MIG_GUEST_RUST_LOG=...  RUST_LOG inside the guest
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# shellcheck source-path=SCRIPTDIR source=../modules.sh
source "$GUEST_DIR/modules.sh"

main() {
    local kdir rootfs=$IGB_WORK/initramfs-root out=$IGB_WORK/initramfs.cpio bin=$WORK/bin
    kdir=$(igb_kernel_dir)
    [[ -x $bin/vfio-mig && -x $bin/vfio-mig-igb-tests ]] || die "igb initramfs: no binaries in $bin: run build.sh"
    [[ -s $IGB_WORK/driver/current ]] || die "igb initramfs: no igb-vfio-pci.ko: run igb/driver.sh"
    local ko
    ko=$IGB_WORK/driver/$(cat "$IGB_WORK/driver/current")/igb-vfio-pci.ko
    [[ -f $ko ]] || die "igb initramfs: $ko missing: run igb/driver.sh"
    local busybox
    busybox=$(command -v busybox || true)
    if [[ -z $busybox ]] || readelf -l "$busybox" | grep -q INTERP; then
        die "busybox missing or not static: install busybox-static"
    fi
    rm -rf "$rootfs"
    mkdir -p "$rootfs"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,run,etc/vfio-mig,lib/modules}
    install -m 0755 "$busybox" "$rootfs/bin/busybox"
    ln -s busybox "$rootfs/bin/sh"
    install -m 0755 "$IGB_DIR/init.sh" "$rootfs/init"
    install -m 0755 "$bin/vfio-mig" "$rootfs/bin/vfio-mig"
    install -m 0755 "$bin/vfio-mig-igb-tests" "$rootfs/bin/vfio-mig-igb-tests"
    install -m 0644 "$ko" "$rootfs/lib/modules/igb_vfio_pci.ko"
    mknod -m 0600 "$rootfs/dev/console" c 5 1 2>/dev/null || true
    {
        printf 'MODULES=%q\n' igb_vfio_pci
        printf 'TEST_ARGS=%q\n' "${VFIO_MIG_IGB_TEST_ARGS:-}"
        printf 'GUEST_RUST_LOG=%q\n' "${VFIO_MIG_GUEST_RUST_LOG:-}"
        printf 'KERNEL_LABEL=%q\n' "ikernel-$(basename "$kdir")"
    } >"$rootfs/etc/vfio-mig/config"
    write_cpio "$rootfs" "$out"
    log "igb initramfs: $out ($(du -h "$out" | cut -f1))"
}

main "$@"
