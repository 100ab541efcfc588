#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# Builds the QEMU of the igb guest once: Debian's qemu_10.0.2+ds.orig.tar.xz (sha256 checked)
# with the fixture's igb VF migration patch (igb x-vf-migration=on), TCG and x86_64-softmmu only.
# Cached under $WORK/igb/qemu/<key>/ where the key hashes the patch, the tarball's sha256, the
# configure flags and the recipe: a second run costs nothing. A build takes ~8 min on 2 cores
# (under nice). Installs its build packages (meson >= 1.5 and python3-pycotap from
# bookworm-backports) unless VFIO_MIG_GUEST_SKIP_APT=1.
#
# Knobs: VFIO_MIG_IGB_JOBS (ninja -j, default nproc), VFIO_MIG_IGB_NICE (default 10).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

QEMU_VER=10.0.2
QEMU_ORIG=qemu_${QEMU_VER}+ds.orig.tar.xz
QEMU_ORIG_SHA256=0901da33844a331bf8b3602b9c1fbd178e60b737c8e3ade678255bd090c9b9f1
CONFIGURE_FLAGS=(--python=/usr/bin/python3 --target-list=x86_64-softmmu --without-default-features
    --disable-docs --disable-werror --disable-download --disable-rust --disable-install-blobs
    --enable-tcg --disable-kvm)
# Bump when this script builds differently from the same inputs (invalidates the cache).
RECIPE=1
BUILD_PACKAGES=(ninja-build pkg-config libglib2.0-dev python3 python3-venv flex bison xz-utils
    curl ca-certificates patch gcc make qemu-system-data seabios)
BACKPORTS_BUILD_PACKAGES=(meson python3-pycotap)

install_build_packages() {
    [[ ${VFIO_MIG_GUEST_SKIP_APT:-0} == 1 ]] && return 0
    local p missing=()
    for p in "${BUILD_PACKAGES[@]}" "${BACKPORTS_BUILD_PACKAGES[@]}"; do
        [[ $(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null) == installed ]] || missing+=("$p")
    done
    # QEMU 10.0 needs meson >= 1.5: bookworm has 1.0, bookworm-backports 1.7.
    if dpkg --compare-versions "$(dpkg-query -W -f='${Version}' meson 2>/dev/null || echo 0)" lt 1.5; then
        missing+=(meson)
    fi
    ((${#missing[@]})) || return 0
    [[ $(id -u) == 0 ]] || die "igb qemu: packages missing (${missing[*]}): run as root"
    # packages.sh (run before this step) has added the bookworm-backports source.
    export DEBIAN_FRONTEND=noninteractive
    log "igb qemu: installing ${missing[*]}"
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends "${BUILD_PACKAGES[@]}" >/dev/null
    apt-get install -y -q --no-install-recommends -t bookworm-backports "${BACKPORTS_BUILD_PACKAGES[@]}" >/dev/null
}

# The archive URI of the plain bookworm suite (the orig tarball is fetched from its pool).
archive_uri() {
    # shellcheck disable=SC2016 # apt's own placeholders, not shell expansions
    apt-get indextargets --format '$(REPO_URI) $(RELEASE)' 2>/dev/null |
        awk '$2 == "bookworm" { print $1; exit }' | grep . ||
        die "igb qemu: no bookworm suite in the apt sources to fetch $QEMU_ORIG from"
}

main() {
    igb_check_fixture
    local key dir=$IGB_WORK/qemu
    key=$({
        cat "$IGB_FIXTURE/$IGB_QEMU_PATCH"
        echo "$QEMU_ORIG_SHA256 ${CONFIGURE_FLAGS[*]} recipe $RECIPE"
    } | sha256sum | cut -c1-16)
    mkdir -p "$dir"
    if [[ -x $dir/$key/qemu-system-x86_64 ]]; then
        echo "$key" >"$dir/current"
        log "igb qemu: cached $key"
        return 0
    fi
    install_build_packages
    local orig=$dir/$QEMU_ORIG
    if ! echo "$QEMU_ORIG_SHA256  $orig" | sha256sum -c --quiet >/dev/null 2>&1; then
        local uri
        uri=$(archive_uri)
        log "igb qemu: downloading ${uri%/}/pool/main/q/qemu/$QEMU_ORIG"
        curl -fsSL -o "$orig.tmp" "${uri%/}/pool/main/q/qemu/$QEMU_ORIG"
        echo "$QEMU_ORIG_SHA256  $orig.tmp" | sha256sum -c --quiet ||
            die "igb qemu: sha256 of the downloaded $QEMU_ORIG is not $QEMU_ORIG_SHA256"
        mv "$orig.tmp" "$orig"
    fi
    local src=$dir/src build=$dir/build t0=$SECONDS
    rm -rf "$src" "$build"
    mkdir -p "$src" "$build"
    tar -C "$src" --strip-components=1 --no-same-owner -xJf "$orig"
    patch -d "$src" -p1 -s <"$IGB_FIXTURE/$IGB_QEMU_PATCH"
    local nice=${VFIO_MIG_IGB_NICE:-10} jobs=${VFIO_MIG_IGB_JOBS:-$(nproc)}
    log "igb qemu: configure + ninja -j$jobs (about 8-10 min on 2 cores)"
    (cd "$build" && nice -n "$nice" "$src/configure" "${CONFIGURE_FLAGS[@]}" >configure.log 2>&1) ||
        { tail -n 30 "$build/configure.log" >&2; die "igb qemu: configure failed ($build/configure.log)"; }
    (cd "$build" && nice -n "$nice" ninja -j"$jobs" qemu-system-x86_64 >build.log 2>&1) ||
        { grep -A10 FAILED "$build/build.log" | head -n 40 >&2; die "igb qemu: build failed ($build/build.log)"; }
    "$build/qemu-system-x86_64" -device igb,help | grep -q x-vf-migration ||
        die "igb qemu: the built QEMU has no igb x-vf-migration property (patch not applied?)"
    mkdir -p "$dir/$key"
    cp "$build/qemu-system-x86_64" "$dir/$key/"
    echo "$key" >"$dir/current"
    # The build tree is 1 GB and never reused: a new key rebuilds from scratch.
    rm -rf "$src" "$build"
    log "igb qemu: built $key in $((SECONDS - t0)) s"
}

main "$@"
