#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# The project's whole test suite, as CI runs it on a bare machine:
#   1. formatting, clippy (-D warnings) and rustdoc (-D warnings);
#   2. every host test of the workspace (unit, property, integration, CLI), in release mode;
#   3. Cloud Hypervisor with the vfio-mig patch: built, its tests that need no KVM
#      (scripts/cloud-hypervisor.sh; VFIO_MIG_SKIP_CH=1 skips it, not a full pass);
#   4. the guest tests against the kernel's mtty sample driver in a QEMU guest, and against the
#      igb-vfio-pci driver on QEMU's emulated igb VFs in a third guest (scripts/guest/run.sh
#      installs what it needs: apt as root, Debian kernel packages, the patched QEMU built from
#      the fixture ../shared/igb-vfio, which must be there).
#
# The host tests include the vfio-user tests, against libvfio-user's sample server built from
# ../shared/libvfio-user (or VFIO_MIG_LIBVFIO_USER_SRC) by scripts/libvfio-user.sh, which
# installs meson, ninja-build, pkg-config, libjson-c-dev and libcmocka-dev when missing.
#
# Set VFIO_MIG_SKIP_GUEST=1 to run only 1 to 3, VFIO_MIG_SKIP_IGB=1 to leave out the igb guest,
# VFIO_MIG_SKIP_VFIO_USER=1 to run without libvfio-user (the run then says so; none of them is
# a full pass).
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==== %s\n' "$*"; }

step "toolchain"
cargo --version
rustup component add rustfmt clippy >/dev/null 2>&1 || true

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings
# The guest tests are `test = false` targets, which --all-targets skips.
cargo clippy -p vfio-mig-tests --test guest --test guest_igb --locked -- -D warnings

step "cargo doc (warnings are errors)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked
# Each published crate alone, at its default features (what a user of it builds) and with
# every feature (what docs.rs builds: `[package.metadata.docs.rs] all-features`).
for crate in vfio-mig vfio-mig-session vfio-mig-fence vfio-mig-mock vfio-mig-user vfio-mig-cli vfio-mig-etcd vfio-mig-testcerts vmm-glue; do
    RUSTDOCFLAGS="-D warnings" cargo doc -p "$crate" --no-deps --locked
    RUSTDOCFLAGS="-D warnings" cargo doc -p "$crate" --all-features --no-deps --locked
done

step "builds without default features (no KVM, no iommufd, no v1, no TLS)"
cargo build -p vmm-glue --no-default-features --locked
cargo build -p vfio-mig --no-default-features --locked
cargo build -p vfio-mig-session --no-default-features --locked

step "host tests (release)"
# The network-namespace test (vfio-mig/tests/net.rs) needs root and `ip`: install iproute2
# when it is missing and we are root (VFIO_MIG_REQUIRE_NETNS=1 makes a skip a failure).
if ! command -v ip >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2
fi
# The fencing tests (vfio-mig/etcd/tests, vfio-mig/cli/tests/fence_store.rs) start 3-member
# etcd clusters on loopback: install Debian's etcd-server (3.4 on bookworm) when it is
# missing and we are root.
if ! command -v etcd >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server
    # The package enables a system etcd on 2379; the tests start their own on free ports.
    if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
        systemctl disable --now etcd >/dev/null 2>&1 || true
    fi
fi
# As root the network-namespace, etcd and tmpfs tests must really run: a skip would fail the suite.
if [ "$(id -u)" = 0 ]; then
    export VFIO_MIG_REQUIRE_NETNS=1
    export VFIO_MIG_REQUIRE_ETCD=1
    # The soak's full-disk faults (vfio-mig/cli/tests/soak) mount small tmpfs.
    export VFIO_MIG_REQUIRE_TMPFS=1
fi
if [ "${VFIO_MIG_SKIP_VFIO_USER:-0}" = 1 ]; then
    step "vfio-user tests SKIPPED (VFIO_MIG_SKIP_VFIO_USER=1): this is not a full pass"
else
    step "libvfio-user's sample server and client (scripts/libvfio-user.sh)"
    VFIO_MIG_LIBVFIO_USER="$(scripts/libvfio-user.sh)"
    export VFIO_MIG_LIBVFIO_USER
    echo "$VFIO_MIG_LIBVFIO_USER"
fi
cargo test --workspace --release --locked

step "vmm-glue example: a VMM-side live migration with guest memory and a device"
cargo run --release --locked -p vmm-glue --example live_migration

step "vmm-glue example: a VFIO device behind Cloud Hypervisor's vm-migration traits"
cargo run --release --locked -p vmm-glue --example cloud_hypervisor

step "the main job: vfio-mig demo"
cargo run --release --locked -p vfio-mig-cli -- demo

step "Cloud Hypervisor with vfio-mig: the patch applied, built, its tests (scripts/cloud-hypervisor.sh)"
# Needs ../shared/cloud-hypervisor; VFIO_MIG_SKIP_CH=1 skips it (the script says: not a full pass).
scripts/cloud-hypervisor.sh

if [ "${VFIO_MIG_SKIP_GUEST:-0}" = 1 ]; then
    step "guest tests SKIPPED (VFIO_MIG_SKIP_GUEST=1): this is not a full pass"
    exit 0
fi
step "guest tests (mtty in two QEMU guests, igb-vfio-pci in a third)"
scripts/guest/run.sh
if [ "${VFIO_MIG_SKIP_VFIO_USER:-0}" = 1 ]; then
    step "all tests passed, without the vfio-user tests: this is not a full pass"
    exit 0
fi
step "all tests passed"
