#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# Boots a guest kernel + $WORK/initramfs.cpio in QEMU, always under `timeout`, tees the serial
# console to a log and to stdout, and judges the boot ONLY by the guest's marker line
# ("VFIO-MIG-GUEST: PASS" / "VFIO-MIG-GUEST: FAIL (<reason>)"): QEMU's exit status says nothing
# about the tests. Exit 0 on PASS, 1 otherwise.
#
# Usage: boot.sh [debian|iommufd]   (default debian)
#   debian   the Debian kernel ($WORK/vmlinuz, modules from the initramfs), tests run once with
#            VFIO_MIG_BACKEND=group; console log $WORK/console.log
#   iommufd  the iommufd kernel of ikernel.sh (vfio, mdev, mtty built in), tests run twice, with
#            VFIO_MIG_BACKEND=iommufd then group; console log $WORK/console-iommufd.log. It
#            also has CONFIG_IOMMUFD_TEST (vfio_mig_iommufd_test): the iommufd_dirty tests run
#            only there
# The guest prints one "VFIO-MIG-RUN: <kernel>/<backend>: PASS|FAIL" line per run; PASS also
# needs one such PASS line for every backend asked for.
#
# Knobs:
#   VFIO_MIG_GUEST_TIMEOUT=600     seconds before QEMU is killed (the run then fails)
#   VFIO_MIG_GUEST_ACCEL=auto      auto | tcg | kvm. auto uses KVM only when /dev/kvm opens
#                                  read-write, /proc/cpuinfo shows vmx or svm, and a probe boot
#                                  succeeds; otherwise TCG. kvm forces KVM (no probe).
#   VFIO_MIG_GUEST_MEM=1G, VFIO_MIG_GUEST_SMP=2
#   VFIO_MIG_GUEST_APPEND=...      extra kernel command line words
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

TIMEOUT=${VFIO_MIG_GUEST_TIMEOUT:-600}
INITRD=$WORK/initramfs.cpio
RUN=${1:-debian}
case $RUN in
    debian)
        LOG=$WORK/console.log
        KERNEL=$WORK/vmlinuz
        BACKENDS=(group)
        GUEST_ARGS="vfio_mig_kernel=debian-$(current_abi) vfio_mig_backends=group"
        ;;
    iommufd)
        ikernel_enabled || die "VFIO_MIG_GUEST_IOMMUFD=0: no iommufd kernel to boot"
        [[ -s $WORK/ikernel/current ]] || die "no iommufd kernel built yet: run ikernel.sh"
        LOG=$WORK/console-iommufd.log
        KERNEL=$WORK/ikernel/$(cat "$WORK/ikernel/current")/bzImage
        BACKENDS=(iommufd group)
        GUEST_ARGS="vfio_mig_kernel=iommufd-$(current_version | sed 's/[^0-9A-Za-z.+~-]//g') vfio_mig_backends=iommufd,group vfio_mig_builtin vfio_mig_iommufd_test"
        ;;
    *) die "usage: boot.sh [debian|iommufd] (got '$RUN')" ;;
esac

# Sets the array QEMU_CMD for accelerator $1, memory $2, cpus $3, kernel command line $4.
qemu_cmd() {
    QEMU_CMD=(qemu-system-x86_64 -accel "$1" -m "$2" -smp "$3" -nographic -nic none -no-reboot
        -kernel "$KERNEL" -initrd "$INITRD" -append "$4")
}

kvm_usable() {
    # Opening for read-write is the real test (-w is always true for root).
    { exec 3<>/dev/kvm; } 2>/dev/null || return 1
    exec 3>&-
    grep -qwE 'vmx|svm' /proc/cpuinfo || return 1
    log "probing KVM with a short boot"
    local out
    qemu_cmd kvm 512M 1 'console=ttyS0 panic=-1 quiet vfio_mig_probe'
    out=$(timeout --kill-after=5 30 "${QEMU_CMD[@]}" </dev/null 2>&1 | clean_console) || true
    grep -qx 'VFIO-MIG-PROBE: OK' <<<"$out"
}

choose_accel() {
    case ${VFIO_MIG_GUEST_ACCEL:-auto} in
        tcg) echo tcg ;;
        kvm) echo kvm ;;
        auto)
            if kvm_usable; then
                echo kvm
            else
                log "KVM not usable here (needs /dev/kvm read-write, vmx/svm, a working probe boot): TCG"
                echo tcg
            fi
            ;;
        *) die "VFIO_MIG_GUEST_ACCEL must be auto, tcg or kvm (got '$VFIO_MIG_GUEST_ACCEL')" ;;
    esac
}

main() {
    [[ -f $KERNEL && -f $INITRD ]] || die "no $KERNEL / $INITRD: run kernel.sh, build.sh and initramfs.sh"
    command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 not installed: run packages.sh"
    local accel append
    accel=$(choose_accel)
    append="console=ttyS0 panic=-1 quiet $GUEST_ARGS ${VFIO_MIG_GUEST_APPEND:-}"
    append=${append% }
    qemu_cmd "$accel" "${VFIO_MIG_GUEST_MEM:-1G}" "${VFIO_MIG_GUEST_SMP:-2}" "$append"
    local -a cmd=("${QEMU_CMD[@]}")
    log "boot $RUN: accel=$accel timeout=${TIMEOUT}s console log: $LOG"
    log "boot: $(printf '%q ' "${cmd[@]}")"

    local start end rcs rc
    start=$(date +%s.%N)
    set +e
    # --foreground: keep QEMU in our process group so ^C reaches it; stdin from /dev/null so
    # QEMU never touches the terminal.
    timeout --foreground --kill-after=10 "$TIMEOUT" "${cmd[@]}" </dev/null 2>&1 | tee "$LOG"
    rcs=("${PIPESTATUS[@]}")
    set -e
    rc=${rcs[0]}
    end=$(date +%s.%N)
    local secs
    secs=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }')

    local markers
    markers=$(clean_console <"$LOG" | grep -aE '^VFIO-MIG-GUEST: (PASS|FAIL)' || true)
    local n
    n=$(grep -c . <<<"$markers" || true)
    # One PASS line per backend asked for, so that a run the guest skipped cannot pass.
    local runs b missing_runs=()
    runs=$(clean_console <"$LOG" | grep -aE '^VFIO-MIG-RUN: ' || true)
    for b in "${BACKENDS[@]}"; do
        grep -qE "^VFIO-MIG-RUN: [^ ]+/$b: PASS" <<<"$runs" || missing_runs+=("$b")
    done
    echo
    [[ -z $runs ]] || printf '%s
' "$runs" | sed 's/^/    /' >&2
    if [[ $n -eq 1 && $markers == 'VFIO-MIG-GUEST: PASS' && ${#missing_runs[@]} -eq 0 ]]; then
        log "RESULT ($RUN): PASS (guest ran ${secs}s with $accel; backends: ${BACKENDS[*]}; log: $LOG)"
        return 0
    fi
    if [[ $n -eq 1 && $markers == 'VFIO-MIG-GUEST: PASS' ]]; then
        log "RESULT ($RUN): FAIL: no passing run for backend(s) ${missing_runs[*]} (log: $LOG)"
        return 1
    fi
    if [[ $n -gt 1 ]]; then
        log "RESULT ($RUN): FAIL: $n marker lines in the console log (expected exactly one):"
        printf '%s\n' "$markers" >&2
    elif [[ $n -eq 1 ]]; then
        log "RESULT ($RUN): FAIL: guest said '$markers' (log: $LOG)"
    elif [[ $rc -eq 124 || $rc -eq 137 ]]; then
        log "RESULT ($RUN): FAIL: no marker line, QEMU killed after the ${TIMEOUT}s timeout (log: $LOG)"
    else
        log "RESULT ($RUN): FAIL: no marker line; QEMU exited with status $rc after ${secs}s (guest crash or panic?) (log: $LOG)"
    fi
    return 1
}

main "$@"
