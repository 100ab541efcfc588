#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# Builds the static Rust binaries that run inside the guest and copies them to $WORK/bin/:
#   vfio-mig              the project's command (package vfio-mig)
#   vfio-mig-guest-tests  the `guest` integration test target of package vfio-mig-tests
#   vfio-mig-igb-tests    its `guest_igb` target (the igb guest's tests)
# Static glibc (crt-static, no musl target offline), in a separate target dir
# (target/guest by default) so the host build cache stays valid.
#
# Knobs:
#   VFIO_MIG_GUEST_SKIP_BUILD=1        reuse the binaries already in $WORK/bin
#   VFIO_MIG_GUEST_TARGET_DIR=<dir>    cargo target dir of this build (default: target/guest)
#   VFIO_MIG_GUEST_CARGO_PROFILE=...   cargo profile (default: release)
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

BIN_DIR=$WORK/bin

check_static() {
    if readelf -l "$1" | grep -q 'INTERP'; then
        die "$1 is dynamically linked (needs a program interpreter): the guest has no libc"
    fi
}

# Reads cargo JSON messages on stdin; prints the executable of the target named $1 of kind $2.
executable_of() {
    jq -r --arg name "$1" --arg kind "$2" '
        select(.reason == "compiler-artifact" and .target.name == $name
               and (.target.kind | index($kind)) and .executable != null)
        | .executable' | tail -n1
}

main() {
    mkdir -p "$BIN_DIR"
    if [[ ${VFIO_MIG_GUEST_SKIP_BUILD:-0} == 1 ]]; then
        [[ -x $BIN_DIR/vfio-mig && -x $BIN_DIR/vfio-mig-guest-tests && -x $BIN_DIR/vfio-mig-igb-tests ]] ||
            die "VFIO_MIG_GUEST_SKIP_BUILD=1 but $BIN_DIR has no binaries from an earlier run"
        log "rust: VFIO_MIG_GUEST_SKIP_BUILD=1, reusing $BIN_DIR"
        return 0
    fi
    command -v cargo >/dev/null || die "cargo not found (a Rust toolchain is needed)"
    local profile=${VFIO_MIG_GUEST_CARGO_PROFILE:-release}
    local common=(--profile "$profile" --target "$TARGET_TRIPLE" --message-format=json-render-diagnostics)
    export CARGO_TARGET_DIR=$GUEST_TARGET_DIR
    export RUSTFLAGS='-C target-feature=+crt-static'
    cd "$REPO_ROOT"

    log "rust: building vfio-mig (static, $profile, $CARGO_TARGET_DIR)"
    local json bin tests igb_tests
    json=$(cargo build -p vfio-mig-cli --bin vfio-mig "${common[@]}") || die "cargo build -p vfio-mig-cli failed"
    bin=$(executable_of vfio-mig bin <<<"$json")
    [[ -n $bin && -x $bin ]] || die "could not locate the vfio-mig binary in cargo's output"

    log "rust: building the guest test binary (cargo test -p vfio-mig-tests --test guest --no-run)"
    json=$(cargo test -p vfio-mig-tests --test guest --no-run "${common[@]}") ||
        die "cargo test --test guest --no-run failed"
    tests=$(executable_of guest test <<<"$json")
    [[ -n $tests && -x $tests ]] || die "could not locate the guest test binary in cargo's output"

    log "rust: building the igb guest test binary (cargo test -p vfio-mig-tests --test guest_igb --no-run)"
    json=$(cargo test -p vfio-mig-tests --test guest_igb --no-run "${common[@]}") ||
        die "cargo test --test guest_igb --no-run failed"
    igb_tests=$(executable_of guest_igb test <<<"$json")
    [[ -n $igb_tests && -x $igb_tests ]] || die "could not locate the igb guest test binary in cargo's output"

    check_static "$bin"
    check_static "$tests"
    check_static "$igb_tests"
    install -m 0755 "$bin" "$BIN_DIR/vfio-mig"
    install -m 0755 "$tests" "$BIN_DIR/vfio-mig-guest-tests"
    install -m 0755 "$igb_tests" "$BIN_DIR/vfio-mig-igb-tests"
    log "rust: $bin, $tests, $igb_tests -> $BIN_DIR"
}

main "$@"
