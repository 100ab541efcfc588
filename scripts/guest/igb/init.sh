#!/bin/busybox sh
# shellcheck shell=dash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# /init of the igb guest (busybox sh). Loads igb_vfio_pci (vfio, vfio_pci_core and igb are built
# into the kernel), brings both igb PFs' interfaces up (their driver answers the VFs' mailbox
# only then), creates two VFs on each PF (sriov_numvfs), binds every VF to igb-vfio-pci, runs
# the igb guest tests once (group backend) and prints exactly one marker line, "VFIO-MIG-IGB: PASS" or
# "VFIO-MIG-IGB: FAIL (<reason>)", which the host (igb/boot.sh) judges the run by.

/bin/busybox mkdir -p /proc /sys /dev /tmp /run /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
exec </dev/console >/dev/console 2>&1

# Written by igb/initramfs.sh: MODULES, TEST_ARGS, GUEST_RUST_LOG, KERNEL_LABEL.
# shellcheck disable=SC1091 # generated into the initramfs
. /etc/vfio-mig/config

finish() {
    sync
    reboot -f
    sleep 5
    exit 1
}

fail() {
    echo "vfio-mig-igb: kernel messages about vfio/igb and faults:"
    dmesg | grep -iE 'vfio|igb|DMAR|error|fail|bug|warn|oops|call trace' | tail -n 60
    echo
    echo "VFIO-MIG-IGB: FAIL ($*)"
    finish
}

echo "vfio-mig-igb: kernel $(uname -r) ($KERNEL_LABEL), up $(cut -d' ' -f1 /proc/uptime) s"
for m in $MODULES; do
    insmod "/lib/modules/$m.ko" || fail "insmod $m failed"
done
# The driver's dev_dbg lines (state arcs, save/load sizes, dirty ranges) into dmesg.
echo 'module igb_vfio_pci +p' >/sys/kernel/debug/dynamic_debug/control 2>/dev/null
ip link set lo up 2>/dev/null || true

# The igb PFs (8086:10c9) in bus order: PF A behind root port 1, PF B behind root port 2.
pfs=""
for d in /sys/bus/pci/devices/*; do
    [ "$(cat "$d/vendor")" = 0x8086 ] && [ "$(cat "$d/device")" = 0x10c9 ] && pfs="$pfs ${d##*/}"
done
# shellcheck disable=SC2086 # a word list on purpose
set -- $pfs
[ $# -eq 2 ] || fail "expected 2 igb PFs (8086:10c9), found $#:$pfs"
# The PF driver (igb) handles the VFs' mailbox messages (a VF's reset request, after which it
# enables the VF's queues: VFTE, VFRE) and enables transmission (TCTL.EN) only while its
# interface is up.
for pf in $pfs; do
    for n in "/sys/bus/pci/devices/$pf"/net/*; do
        [ -e "$n" ] || fail "$pf has no network interface (igb not bound?)"
        ip link set dev "${n##*/}" up || fail "ip link set ${n##*/} up failed"
        echo "vfio-mig-igb: PF $pf interface ${n##*/} up"
    done
done
# Two VFs per PF; each is unbound from igbvf (not in this initramfs anyway) and bound to
# igb-vfio-pci through driver_override.
vfs=""
for pf in $pfs; do
    echo 2 >"/sys/bus/pci/devices/$pf/sriov_numvfs" || fail "sriov_numvfs=2 on $pf failed"
    for n in 0 1; do
        vf=$(readlink "/sys/bus/pci/devices/$pf/virtfn$n") || fail "$pf has no virtfn$n"
        vfs="$vfs ${vf##*/}"
    done
done
for vf in $vfs; do
    d=/sys/bus/pci/devices/$vf
    [ -e "$d/driver" ] && echo "$vf" >"$d/driver/unbind"
    echo igb-vfio-pci >"$d/driver_override"
    echo "$vf" >/sys/bus/pci/drivers_probe
    drv=$(basename "$(readlink "$d/driver")")
    [ "$drv" = igb-vfio-pci ] || fail "$vf bound to '$drv', not igb-vfio-pci"
    echo "vfio-mig-igb: VF $vf $(cat "$d/vendor"):$(cat "$d/device") driver $drv iommu_group $(basename "$(readlink "$d/iommu_group")")"
    list="$list /sys/bus/pci/devices/$vf"
done
# PF A VF0, PF A VF1, PF B VF0, PF B VF1.
export VFIO_MIG_IGB_VFS="${list# }"
export VFIO_MIG_BIN=/bin/vfio-mig
export VFIO_MIG_BACKEND=group
export RUST_BACKTRACE=1
[ -n "$GUEST_RUST_LOG" ] && export RUST_LOG="$GUEST_RUST_LOG"
echo "vfio-mig-igb: VFIO_MIG_IGB_VFS=$VFIO_MIG_IGB_VFS"
ls -l /dev/vfio

cd /tmp || fail "cd /tmp"
echo "vfio-mig-igb: ==== tests, up $(cut -d' ' -f1 /proc/uptime) s"
# --show-output: each test's log (the vfio-mig commands it ran, the dirty test's pages) is
# printed after the results, passing tests' too, and every "test NAME ... ok" stays one line.
# shellcheck disable=SC2086 # TEST_ARGS is a word list on purpose
(
    /bin/vfio-mig-igb-tests --test-threads=1 --show-output $TEST_ARGS
    echo $? >/tmp/.rc
) 2>&1 | sed "s|^|[igb] |"
rc=$(cat /tmp/.rc 2>/dev/null || echo 255)
echo "vfio-mig-igb: tests done (exit $rc), up $(cut -d' ' -f1 /proc/uptime) s"
echo "vfio-mig-igb: igb-vfio-pci kernel messages:"
dmesg | grep -E 'igb-vfio|igb_vfio|DVSEC' | tail -n 80 | sed 's/^/    /'
[ "$rc" -eq 0 ] || fail "igb guest tests failed (exit $rc)"
if dmesg | grep -qE 'BUG:|Oops|Call Trace|WARNING:'; then
    fail "kernel reported a bug, oops or warning during the tests"
fi
echo
echo "VFIO-MIG-IGB: PASS"
finish
