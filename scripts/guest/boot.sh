#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# Boots $WORK/vmlinuz + $WORK/initramfs.cpio in QEMU, always under `timeout`, tees the serial
# console to $WORK/console.log and to stdout, and judges the run ONLY by the guest's marker line
# ("VFIO-MIG-GUEST: PASS" / "VFIO-MIG-GUEST: FAIL (<reason>)"): QEMU's exit status says nothing
# about the tests. Exit 0 on PASS, 1 otherwise.
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
LOG=$WORK/console.log
KERNEL=$WORK/vmlinuz
INITRD=$WORK/initramfs.cpio

# Sets the array QEMU_CMD for accelerator $1, memory $2, cpus $3, kernel command line $4.
qemu_cmd() {
    QEMU_CMD=(qemu-system-x86_64 -accel "$1" -m "$2" -smp "$3" -nographic -nic none -no-reboot
        -kernel "$KERNEL" -initrd "$INITRD" -append "$4")
}

# Console text without carriage returns and terminal escape sequences (SeaBIOS emits some).
clean_console() {
    sed -E $'s/\r//g; s/\x1b\\[[0-9;?]*[A-Za-z]//g; s/\x1b[@-Z\\\\-_a-z]//g'
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
    append="console=ttyS0 panic=-1 quiet ${VFIO_MIG_GUEST_APPEND:-}"
    append=${append% }
    qemu_cmd "$accel" "${VFIO_MIG_GUEST_MEM:-1G}" "${VFIO_MIG_GUEST_SMP:-2}" "$append"
    local -a cmd=("${QEMU_CMD[@]}")
    log "boot: accel=$accel timeout=${TIMEOUT}s console log: $LOG"
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
    echo
    if [[ $n -eq 1 && $markers == 'VFIO-MIG-GUEST: PASS' ]]; then
        log "RESULT: PASS (guest ran ${secs}s with $accel; log: $LOG)"
        return 0
    fi
    if [[ $n -gt 1 ]]; then
        log "RESULT: FAIL: $n marker lines in the console log (expected exactly one):"
        printf '%s\n' "$markers" >&2
    elif [[ $n -eq 1 ]]; then
        log "RESULT: FAIL: guest said '$markers' (log: $LOG)"
    elif [[ $rc -eq 124 || $rc -eq 137 ]]; then
        log "RESULT: FAIL: no marker line, QEMU killed after the ${TIMEOUT}s timeout (log: $LOG)"
    else
        log "RESULT: FAIL: no marker line; QEMU exited with status $rc after ${secs}s (guest crash or panic?) (log: $LOG)"
    fi
    return 1
}

main "$@"
