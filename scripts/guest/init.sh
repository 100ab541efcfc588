#!/bin/busybox sh
# shellcheck shell=dash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# /init of the guest initramfs (busybox sh, not bash). Installed by initramfs.sh.
# Loads vfio + mdev + mtty, creates the mtty mdevs, loads our v1 migration sample module
# (mig_v1_sample, kmod/mig-v1-sample) and creates its mdevs, runs the guest test binary (once per
# backend named by vfio_mig_backends= on the kernel command line; the iommufd kernel has vfio, mdev
# and mtty built in and no v1 sample: vfio_mig_builtin), removes the sample's mdevs and unloads
# it (refcount 0, rmmod, no warnings of it in dmesg), and prints exactly one marker line,
# "VFIO-MIG-GUEST: PASS" or "VFIO-MIG-GUEST: FAIL (<reason>)", which the host (boot.sh) judges
# the run by. Then powers the VM off (reboot -f with QEMU's -no-reboot).

/bin/busybox mkdir -p /proc /sys /dev /tmp /run /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
exec </dev/console >/dev/console 2>&1

# Written by initramfs.sh: MODULES, MDEV_TYPE, MDEV_COUNT, TEST_ARGS, GUEST_RUST_LOG, V1_MODULE
# (mig_v1_sample, or empty to leave it out), V1_MDEVS (mdevs per type of it), V1_PARAMS (its
# module parameters).
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
    dmesg | grep -iE 'vfio|mdev|mtty|mig_v1|mig-v1|error|fail|bug|warn|oops|call trace' | tail -n 60
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

# Which kernel this is and which backends to test, from the kernel command line (boot.sh):
#   vfio_mig_kernel=LABEL        the kernel's name in the log (e.g. debian-6.12.117+deb12)
#   vfio_mig_backends=B1[,B2]    run the whole test binary once per VFIO_MIG_BACKEND value
#   vfio_mig_builtin             vfio, mdev and mtty are built in (the iommufd kernel): no insmod
#   vfio_mig_iommufd_test        the kernel has CONFIG_IOMMUFD_TEST (the iommufd kernel): the
#                                iommufd_dirty tests run (and fail if IOMMU_TEST_CMD is missing)
KERNEL_LABEL=$(uname -r)
BACKENDS=group
BUILTIN=""
IOMMUFD_TEST=""
# shellcheck disable=SC2013 # words, not lines, on purpose
for word in $(cat /proc/cmdline); do
    case $word in
        vfio_mig_kernel=*) KERNEL_LABEL=${word#*=} ;;
        vfio_mig_backends=*) BACKENDS=$(echo "${word#*=}" | tr ',' ' ') ;;
        vfio_mig_builtin) BUILTIN=1 ;;
        vfio_mig_iommufd_test) IOMMUFD_TEST=1 ;;
    esac
done

echo "vfio-mig-guest: kernel $(uname -r) ($KERNEL_LABEL), backends: $BACKENDS, up $(cut -d' ' -f1 /proc/uptime) s"
# Where the v1 sample module for this kernel is: the iommufd kernel has its own build of it.
V1_DIR=/lib/modules
if [ -n "$BUILTIN" ]; then
    echo "vfio-mig-guest: vfio, mdev and mtty are built into this kernel: no modules loaded"
    V1_DIR=/lib/modules/ikernel
    if [ -n "$V1_MODULE" ] && [ ! -f "$V1_DIR/$V1_MODULE.ko" ]; then
        echo "vfio-mig-guest: no $V1_MODULE built for this kernel ($V1_DIR): left out"
        V1_MODULE=""
    fi
else
    for m in $MODULES; do
        insmod "/lib/modules/$m.ko" || fail "insmod $m failed"
    done
fi
# Loopback up, for tests over tcp:127.0.0.1 (no network otherwise).
ip link set lo up 2>/dev/null || true

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

# Our v1 sample: V1_MDEVS mdevs of each type; its dmesg lines are judged from this marker on.
V1_UUID_PREFIX=6d696731-0000-4000-8000-
if [ -n "$V1_MODULE" ]; then
    echo "<6>vfio-mig-guest: loading $V1_MODULE" >/dev/kmsg
    # shellcheck disable=SC2086 # V1_PARAMS is a word list on purpose
    insmod "$V1_DIR/$V1_MODULE.ko" $V1_PARAMS || fail "insmod $V1_MODULE $V1_PARAMS failed"
    v1_types=/sys/class/mdev_bus/mig-v1-sample/mdev_supported_types
    n=1
    for t in trapped mmap; do
        [ -d "$v1_types/mig-v1-$t" ] || fail "mdev type mig-v1-$t missing in $v1_types"
        list=""
        i=1
        while [ "$i" -le "$V1_MDEVS" ]; do
            uuid=$(printf '%s%012x' "$V1_UUID_PREFIX" $((n * 256 + i)))
            echo "$uuid" >"$v1_types/mig-v1-$t/create" || fail "creating mdev $uuid of type mig-v1-$t failed"
            list="$list /sys/bus/mdev/devices/$uuid"
            i=$((i + 1))
        done
        if [ "$t" = trapped ]; then VFIO_MIG_V1_TRAPPED="${list# }"; else VFIO_MIG_V1_MMAP="${list# }"; fi
        n=$((n + 1))
    done
    export VFIO_MIG_V1_TRAPPED VFIO_MIG_V1_MMAP
    export VFIO_MIG_V1_DEVICES="$VFIO_MIG_V1_TRAPPED $VFIO_MIG_V1_MMAP"
    echo "vfio-mig-guest: VFIO_MIG_V1_TRAPPED=$VFIO_MIG_V1_TRAPPED"
    echo "vfio-mig-guest: VFIO_MIG_V1_MMAP=$VFIO_MIG_V1_MMAP"
else
    echo "vfio-mig-guest: mig_v1_sample not loaded in this guest: skipping the v1_sample tests"
    TEST_ARGS="$TEST_ARGS --skip v1_sample::"
fi
# The iommufd_dirty tests drive the iommufd selftest's mock IOMMU (IOMMU_TEST_CMD): only the
# kernel that says it has CONFIG_IOMMUFD_TEST runs them; elsewhere they are left out, visibly.
if [ -n "$IOMMUFD_TEST" ]; then
    echo "vfio-mig-guest: CONFIG_IOMMUFD_TEST kernel: running the iommufd_dirty tests (mock IOMMU dirty tracking)"
else
    echo "vfio-mig-guest: no CONFIG_IOMMUFD_TEST in this kernel: skipping the iommufd_dirty tests (they run on the iommufd kernel)"
    TEST_ARGS="$TEST_ARGS --skip iommufd_dirty::"
fi
ls -l /dev/vfio

# Removes the v1 sample's mdevs and unloads it; sets v1_problem on failure. Then prints its
# kernel messages since it was loaded, and fails on any warning of it (the taint notice aside)
# or any kernel WARNING/BUG.
v1_problem=""
v1_unload_and_check() {
    for dev in $VFIO_MIG_V1_DEVICES; do
        echo 1 >"$dev/remove" || v1_problem="removing mdev ${dev##*/} failed"
    done
    refcnt=$(cat "/sys/module/$V1_MODULE/refcnt" 2>/dev/null)
    echo "vfio-mig-guest: $V1_MODULE refcnt after removing its mdevs: ${refcnt:-unreadable}"
    if [ -n "$v1_problem" ]; then
        :
    elif [ "$refcnt" != 0 ]; then
        v1_problem="$V1_MODULE refcnt ${refcnt:-unreadable}, not 0, after its mdevs were removed (leaked references)"
    elif ! rmmod "$V1_MODULE"; then
        v1_problem="rmmod $V1_MODULE failed"
    elif [ -e "/sys/module/$V1_MODULE" ]; then
        v1_problem="$V1_MODULE still loaded after rmmod"
    fi
    if [ -z "$v1_problem" ]; then
        echo "vfio-mig-guest: $V1_MODULE unloaded cleanly (refcnt 0, mdevs removed, rmmod ok)"
    else
        echo "vfio-mig-guest: $V1_MODULE unload FAILED: $v1_problem"
    fi
    window=$(dmesg -r | sed -n "/vfio-mig-guest: loading $V1_MODULE/,\$p")
    echo "vfio-mig-guest: kernel messages of $V1_MODULE from load to unload:"
    echo "$window" | grep -E "mig_v1_sample|mig-v1|$V1_UUID_PREFIX" | sed 's/^/    /'
    # Raw levels: <0>..<4> are emerg..warning (kernel facility).
    warnings=$(echo "$window" | grep -E '^<[0-4]>' | grep -E "mig_v1_sample|mig-v1|$V1_UUID_PREFIX" |
        grep -vE 'taints kernel|tainting kernel')
    generic=$(echo "$window" | grep -E 'WARNING:|BUG:|Oops|Call Trace|refcount_t:|general protection')
    if [ -n "$warnings$generic" ]; then
        echo "vfio-mig-guest: warnings since $V1_MODULE was loaded:"
        printf '%s\n%s\n' "$warnings" "$generic" | grep . | sed 's/^/    /'
        [ -n "$v1_problem" ] || v1_problem="kernel warnings from or around $V1_MODULE"
    else
        echo "vfio-mig-guest: no warnings from $V1_MODULE in dmesg (load, tests, unload)"
    fi
}

cd /tmp || fail "cd /tmp"
# One run of the whole test binary per backend, every line of it prefixed with
# [<kernel label>/<backend>]; then one "VFIO-MIG-RUN: <label>/<backend>: PASS|FAIL (...)" line
# per run, which boot.sh checks too. rc is the first failing run's status.
# Removes and re-creates mdevs (same UUIDs, type $2 under types dir $1), so that a run starts
# from devices as fresh as after boot: tests may leave a device stopped or its FIFO full.
recreate_mdevs() {
    rm_types=$1
    rm_type=$2
    shift 2
    for dev in "$@"; do
        echo 1 >"$dev/remove" || fail "removing mdev ${dev##*/} failed"
        echo "${dev##*/}" >"$rm_types/$rm_type/create" ||
            fail "re-creating mdev ${dev##*/} of type $rm_type failed"
    done
}

rc=0
failed_runs=""
run_no=0
for backend in $BACKENDS; do
    tag="$KERNEL_LABEL/$backend"
    if [ "$run_no" -gt 0 ]; then
        echo "vfio-mig-guest: re-creating the mdevs for a fresh start"
        # shellcheck disable=SC2086 # device lists are word lists on purpose
        recreate_mdevs "$types" "$MDEV_TYPE" $VFIO_MIG_MTTY_DEVICES
        if [ -n "$V1_MODULE" ]; then
            # shellcheck disable=SC2086
            recreate_mdevs "$v1_types" mig-v1-trapped $VFIO_MIG_V1_TRAPPED
            # shellcheck disable=SC2086
            recreate_mdevs "$v1_types" mig-v1-mmap $VFIO_MIG_V1_MMAP
        fi
    fi
    run_no=$((run_no + 1))
    echo "vfio-mig-guest: ==== run $tag: VFIO_MIG_BACKEND=$backend, up $(cut -d' ' -f1 /proc/uptime) s"
    # shellcheck disable=SC2086 # TEST_ARGS is a word list on purpose
    (
        VFIO_MIG_BACKEND=$backend /bin/vfio-mig-guest-tests --test-threads=1 $TEST_ARGS
        echo $? >/tmp/.vfio-mig-rc
    ) 2>&1 | tee /tmp/.vfio-mig-run.log | sed "s|^|[$tag] |"
    run_rc=$(cat /tmp/.vfio-mig-rc 2>/dev/null || echo 255)
    summary=$(grep '^test result:' /tmp/.vfio-mig-run.log | tail -n1)
    rm -f /tmp/.vfio-mig-rc /tmp/.vfio-mig-run.log
    if [ "$run_rc" -eq 0 ]; then
        echo "VFIO-MIG-RUN: $tag: PASS (${summary:-no test result line})"
    else
        echo "VFIO-MIG-RUN: $tag: FAIL (exit $run_rc; ${summary:-no test result line})"
        failed_runs="$failed_runs $tag"
        [ "$rc" -ne 0 ] || rc=$run_rc
    fi
done
echo "vfio-mig-guest: tests done (exit $rc), up $(cut -d' ' -f1 /proc/uptime) s"
[ -n "$V1_MODULE" ] && v1_unload_and_check
[ "$rc" -eq 0 ] || fail "guest tests failed in run(s):$failed_runs (first status $rc)"
[ -z "$v1_problem" ] || fail "$v1_problem"
if dmesg | grep -qE 'BUG:|Oops|Call Trace'; then
    fail "kernel reported a bug or oops during the tests"
fi
echo
echo "VFIO-MIG-GUEST: PASS"
finish
