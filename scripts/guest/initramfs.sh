#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# Assembles $WORK/initramfs.cpio (newc, uncompressed): static busybox, /init (init.sh), the
# modules vfio, vfio_iommu_type1, mdev, mtty and whatever they depend on (decompressed on the
# host, in dependency order found with modinfo), and the binaries from build.sh; plus our own v1
# migration sample module mig_v1_sample.ko (kmod/mig-v1-sample, built by kernel.sh), which /init
# loads after them and unloads after the tests.
#
# Knobs:
#   VFIO_MIG_GUEST_MDEVS=4           number of mtty mdevs the guest creates
#   VFIO_MIG_GUEST_MDEV_TYPE=mtty-2  their type (mtty-1: one port, mtty-2: two ports)
#   VFIO_MIG_GUEST_V1_MDEVS=2        mig_v1_sample mdevs of EACH type (mig-v1-trapped, mig-v1-mmap);
#                                    0: leave the module out and skip the v1_sample tests
#   VFIO_MIG_GUEST_V1_PARAMS=...     its module parameters, e.g. "state_size=4194304 chunk_size=4096"
#   VFIO_MIG_GUEST_TEST_ARGS=...     extra arguments of the guest test binary (e.g. a name filter)
#   VFIO_MIG_GUEST_RUST_LOG=...      RUST_LOG inside the guest
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# What the guest loads; dependencies (modinfo depends, softdep pre/post) are added around them.
WANTED_MODULES=(vfio vfio_iommu_type1 mdev mtty)

# shellcheck source-path=SCRIPTDIR source=modules.sh
source "$GUEST_DIR/modules.sh"

main() {
    local abi root rootfs out=$WORK/initramfs.cpio
    abi=$(current_abi)
    root=$WORK/kernel/$abi/root
    rootfs=$WORK/initramfs-root
    local bin=$WORK/bin
    [[ -x $bin/vfio-mig && -x $bin/vfio-mig-guest-tests ]] || die "no binaries in $bin: run build.sh"
    local busybox
    busybox=$(command -v busybox || true)
    if [[ -z $busybox ]] || readelf -l "$busybox" | grep -q INTERP; then
        die "busybox missing or not static: install busybox-static"
    fi

    index_modules "$root/lib/modules/$abi-amd64"
    MOD_PATH[mtty]=$WORK/kernel/$abi/mtty/mtty.ko
    local m
    for m in "${WANTED_MODULES[@]}"; do
        visit "$m"
    done
    # mig_v1_sample is loaded (and unloaded) by /init on its own, after the modules above.
    local v1_mdevs=${VFIO_MIG_GUEST_V1_MDEVS:-2} v1_module="" v1_ko
    v1_ko=$WORK/kernel/$abi/mig-v1-sample/mig_v1_sample.ko
    if [[ $v1_mdevs != 0 ]]; then
        [[ -f $v1_ko ]] || die "no $v1_ko: run kernel.sh (or set VFIO_MIG_GUEST_V1_MDEVS=0)"
        for m in $(modinfo -F depends "$v1_ko" | tr ',' ' '); do
            visit "$m"
        done
        v1_module=mig_v1_sample
    fi
    log "initramfs: module load order: ${ORDER[*]}${v1_module:+ (then $v1_module)}"

    rm -rf "$rootfs"
    mkdir -p "$rootfs"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,run,etc/vfio-mig,lib/modules}
    install -m 0755 "$busybox" "$rootfs/bin/busybox"
    ln -s busybox "$rootfs/bin/sh"
    install -m 0755 "$GUEST_DIR/init.sh" "$rootfs/init"
    install -m 0755 "$bin/vfio-mig" "$rootfs/bin/vfio-mig"
    install -m 0755 "$bin/vfio-mig-guest-tests" "$rootfs/bin/vfio-mig-guest-tests"
    copy_modules "$rootfs/lib/modules"
    if [[ -n $v1_module ]]; then
        install -m 0644 "$v1_ko" "$rootfs/lib/modules/$v1_module.ko"
        # The same module built for the iommufd kernel (ikernel.sh), loaded there instead.
        if ikernel_enabled && [[ -s $WORK/ikernel/current ]]; then
            local ik_ko
            ik_ko=$WORK/ikernel/$(cat "$WORK/ikernel/current")/mig-v1-sample/mig_v1_sample.ko
            [[ -f $ik_ko ]] || die "no $ik_ko: run ikernel.sh"
            install -D -m 0644 "$ik_ko" "$rootfs/lib/modules/ikernel/$v1_module.ko"
        fi
    fi
    # The kernel opens /dev/console for init before /init can mount devtmpfs.
    mknod -m 0600 "$rootfs/dev/console" c 5 1 2>/dev/null || true
    {
        printf 'MODULES=%q\n' "${ORDER[*]}"
        printf 'MDEV_TYPE=%q\n' "${VFIO_MIG_GUEST_MDEV_TYPE:-mtty-2}"
        printf 'MDEV_COUNT=%q\n' "${VFIO_MIG_GUEST_MDEVS:-4}"
        printf 'TEST_ARGS=%q\n' "${VFIO_MIG_GUEST_TEST_ARGS:-}"
        printf 'GUEST_RUST_LOG=%q\n' "${VFIO_MIG_GUEST_RUST_LOG:-}"
        printf 'V1_MODULE=%q\n' "$v1_module"
        printf 'V1_MDEVS=%q\n' "$v1_mdevs"
        printf 'V1_PARAMS=%q\n' "${VFIO_MIG_GUEST_V1_PARAMS:-}"
    } >"$rootfs/etc/vfio-mig/config"

    write_cpio "$rootfs" "$out"
    cp "$root/boot/vmlinuz-$abi-amd64" "$WORK/vmlinuz"
    log "initramfs: $out ($(du -h "$out" | cut -f1)), kernel $WORK/vmlinuz"
}

main "$@"
