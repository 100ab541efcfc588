#!/bin/busybox sh
# shellcheck shell=dash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# /init of the guest initramfs (busybox sh, not bash). Installed by initramfs.sh.
# Loads vfio + mdev + mtty, creates the mtty mdevs, runs the guest test binary and prints exactly
# one marker line, "VFIO-MIG-GUEST: PASS" or "VFIO-MIG-GUEST: FAIL (<reason>)", which the host
# (boot.sh) judges the run by. Then powers the VM off (reboot -f with QEMU's -no-reboot).

/bin/busybox mkdir -p /proc /sys /dev /tmp /run /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
exec </dev/console >/dev/console 2>&1

# Written by initramfs.sh: MODULES, MDEV_TYPE, MDEV_COUNT, TEST_ARGS, GUEST_RUST_LOG.
# shellcheck disable=SC1091 # generated into the initramfs
. /etc/vfio-mig/config

finish() {
    sync
    reboot -f
    sleep 5
    # Not reached; if reboot failed, a panic (panic=-1) ends the VM.
    exit 1
}

fail() {
    echo "vfio-mig-guest: kernel messages about vfio/mdev/mtty and faults:"
    dmesg | grep -iE 'vfio|mdev|mtty|error|fail|bug|warn|oops|call trace' | tail -n 60
    echo
    echo "VFIO-MIG-GUEST: FAIL ($*)"
    finish
}

# KVM probe boot (boot.sh): prove the VM runs, nothing else.
if grep -q 'vfio_mig_probe' /proc/cmdline; then
    echo
    echo "VFIO-MIG-PROBE: OK"
    finish
fi

echo "vfio-mig-guest: kernel $(uname -r), up $(cut -d' ' -f1 /proc/uptime) s"
for m in $MODULES; do
    insmod "/lib/modules/$m.ko" || fail "insmod $m failed"
done

types=/sys/class/mdev_bus/mtty/mdev_supported_types
[ -d "$types/$MDEV_TYPE" ] || fail "mdev type $MDEV_TYPE missing in $types"
devices=""
i=1
while [ "$i" -le "$MDEV_COUNT" ]; do
    uuid=$(printf '83b8f4f2-509f-4a2f-8c1e-%012x' "$i")
    echo "$uuid" >"$types/$MDEV_TYPE/create" || fail "creating mdev $uuid of type $MDEV_TYPE failed"
    devices="$devices /sys/bus/mdev/devices/$uuid"
    i=$((i + 1))
done
export VFIO_MIG_MTTY_DEVICES="${devices# }"
export VFIO_MIG_BIN=/bin/vfio-mig
export RUST_BACKTRACE=1
[ -n "$GUEST_RUST_LOG" ] && export RUST_LOG="$GUEST_RUST_LOG"
echo "vfio-mig-guest: VFIO_MIG_MTTY_DEVICES=$VFIO_MIG_MTTY_DEVICES"
ls -l /dev/vfio

echo "vfio-mig-guest: running tests, up $(cut -d' ' -f1 /proc/uptime) s"
cd /tmp || fail "cd /tmp"
# shellcheck disable=SC2086 # TEST_ARGS is a word list on purpose
/bin/vfio-mig-guest-tests --test-threads=1 $TEST_ARGS
rc=$?
echo "vfio-mig-guest: tests done (exit $rc), up $(cut -d' ' -f1 /proc/uptime) s"
[ "$rc" -eq 0 ] || fail "guest tests exited with status $rc"
if dmesg | grep -qE 'BUG:|Oops|Call Trace'; then
    fail "kernel reported a bug or oops during the tests"
fi
echo
echo "VFIO-MIG-GUEST: PASS"
finish
