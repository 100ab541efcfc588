#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# Prepares the guest kernel under $WORK/kernel/<abi>/:
#   - picks the newest Linux 6.12 ABI (bookworm-security) for which linux-image-<abi>-amd64-unsigned,
#     linux-headers-<abi>-amd64, linux-headers-<abi>-common, linux-kbuild-<abi> and linux-source-6.12
#     of the same version all exist;
#   - apt-get downloads them and dpkg-deb -x them into $WORK/kernel/<abi>/root (nothing is installed);
#   - points the headers' Makefile at the scratch copy of the -common tree;
#   - builds the kernel's sample mdev driver samples/vfio-mdev/mtty.c out of tree (obj-m := mtty.o),
#     keeping the linux-source-6.12 package for ikernel.sh if its iommufd kernel is not built yet;
#   - builds our own v1 migration sample module, kmod/mig-v1-sample, next to it (W=1; any compiler
#     warning fails the step). See docs/v1-sample-module.md.
# Writes the chosen ABI to $WORK/kernel/current. Cached: a prepared ABI is reused without apt.
#
# Knobs:
#   VFIO_MIG_GUEST_KERNEL_ABI=6.12.117+deb12   use this ABI instead of the newest one
#   VFIO_MIG_GUEST_KERNEL_REFRESH=1           ask apt again for the newest ABI even if one is cached
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

APT_DL_OPTS=(-q -o APT::Sandbox::User=root)

candidate_version() {
    apt-cache policy "$1" 2>/dev/null | awk '$1 == "Candidate:" && $2 != "(none)" { print $2; exit }'
}

# Prints "<abi> <version>" of the newest complete 6.12 kernel, or fails.
resolve_abi() {
    local abis abi ver p
    if [[ -n ${VFIO_MIG_GUEST_KERNEL_ABI:-} ]]; then
        abis=$VFIO_MIG_GUEST_KERNEL_ABI
    else
        abis=$(apt-cache pkgnames linux-image-6.12. 2>/dev/null |
            sed -n 's/^linux-image-\(6\.12\.[0-9][^-]*\)-amd64-unsigned$/\1/p' | sort -V -r)
    fi
    for abi in $abis; do
        ver=$(candidate_version "linux-image-$abi-amd64-unsigned")
        [[ -n $ver ]] || continue
        for p in "linux-headers-$abi-amd64" "linux-headers-$abi-common" "linux-kbuild-$abi"; do
            [[ $(candidate_version "$p") == "$ver" ]] || continue 2
        done
        apt-cache madison linux-source-6.12 | awk -F'|' '{ gsub(/ /, "", $2); print $2 }' |
            grep -Fxq "$ver" || continue
        echo "$abi $ver"
        return 0
    done
    return 1
}

prepare_kernel() {
    local abi=$1 ver=$2 dir=$WORK/kernel/$1
    local root=$dir/root debs=$WORK/debs
    if [[ -f $dir/.extracted ]]; then
        return 0
    fi
    mkdir -p "$debs"
    local pkgs=("linux-image-$abi-amd64-unsigned" "linux-headers-$abi-amd64"
        "linux-headers-$abi-common" "linux-kbuild-$abi")
    local p need=()
    for p in "${pkgs[@]}"; do
        compgen -G "$debs/${p}_*.deb" >/dev/null || need+=("$p=$ver")
    done
    if ((${#need[@]})); then
        log "downloading ${need[*]}"
        (cd "$debs" && apt-get download "${APT_DL_OPTS[@]}" "${need[@]}")
    fi
    rm -rf "$root"
    mkdir -p "$root"
    for p in "${pkgs[@]}"; do
        local deb
        deb=$(compgen -G "$debs/${p}_*.deb" | head -n1)
        log "extracting $(basename "$deb")"
        dpkg-deb -x "$deb" "$root"
    done

    # The headers' Makefile includes the -common tree by absolute path under /usr/src.
    local hdr=$root/usr/src/linux-headers-$abi-amd64
    [[ -f $hdr/Makefile ]] || die "no $hdr/Makefile in linux-headers-$abi-amd64"
    sed -i "s#/usr/src/linux-headers-$abi-common#$root/usr/src/linux-headers-$abi-common#g" "$hdr/Makefile"
    grep -q "$root/usr/src/linux-headers-$abi-common" "$hdr/Makefile" ||
        die "could not redirect the -common include in $hdr/Makefile; its content: $(cat "$hdr/Makefile")"
    touch "$dir/.extracted"
    # Downloads are quick; the extracted tree is the cache.
    for p in "${pkgs[@]}"; do
        rm -f "$debs/${p}"_*.deb
    done
}

fetch_mtty_source() {
    local abi=$1 ver=$2 dir=$WORK/kernel/$1/mtty
    [[ -s $dir/mtty.c ]] && return 0
    mkdir -p "$dir" "$WORK/debs"
    local deb
    deb=$(compgen -G "$WORK/debs/linux-source-6.12_${ver}_*.deb" | head -n1 || true)
    if [[ -z $deb ]]; then
        log "downloading linux-source-6.12=$ver (~150 MB: mtty.c, and the iommufd kernel's source)"
        (cd "$WORK/debs" && apt-get download "${APT_DL_OPTS[@]}" "linux-source-6.12=$ver")
        deb=$(compgen -G "$WORK/debs/linux-source-6.12_${ver}_*.deb" | head -n1)
    fi
    log "extracting samples/vfio-mdev/mtty.c from $(basename "$deb")"
    dpkg-deb --fsys-tarfile "$deb" | tar -xO ./usr/src/linux-source-6.12.tar.xz |
        xz -dc | tar -xO --wildcards '*/samples/vfio-mdev/mtty.c' >"$dir/mtty.c.tmp"
    [[ -s $dir/mtty.c.tmp ]] || die "samples/vfio-mdev/mtty.c not found in $deb"
    mv "$dir/mtty.c.tmp" "$dir/mtty.c"
    # The 150 MB source package is no longer needed once mtty.c is out, unless the iommufd
    # kernel (ikernel.sh) is still to be built from it: ikernel.sh deletes it then.
    if ikernel_needed && [[ ! -s $WORK/ikernel/$(ikernel_key "$ver")/bzImage ]]; then
        log "keeping $(basename "$deb") for the iommufd kernel (ikernel.sh)"
    else
        rm -f "$deb"
    fi
}

build_mtty() {
    local abi=$1 dir=$WORK/kernel/$1/mtty
    local hdr=$WORK/kernel/$abi/root/usr/src/linux-headers-$abi-amd64
    if [[ -f $dir/mtty.ko && $dir/mtty.ko -nt $dir/mtty.c ]]; then
        return 0
    fi
    echo 'obj-m := mtty.o' >"$dir/Kbuild"
    log "building mtty.ko against linux-headers-$abi-amd64"
    make -s -C "$hdr" M="$dir" modules >"$dir/build.log" 2>&1 || {
        cat "$dir/build.log" >&2
        die "building mtty.ko failed (log: $dir/build.log)"
    }
    [[ -f $dir/mtty.ko ]] || die "mtty.ko not produced (log: $dir/build.log)"
}

# The headers' Makefile includes the -common tree by absolute path; a cache made under another
# checkout path (or moved) points elsewhere. Re-point it at this cache (idempotent).
repoint_headers() {
    local abi=$1 root=$WORK/kernel/$1/root
    local hdr=$root/usr/src/linux-headers-$abi-amd64 common=$root/usr/src/linux-headers-$abi-common
    grep -qxF "include $common/Makefile" "$hdr/Makefile" && return 0
    sed -i -E "s#^include .*/linux-headers-[^/]*-common/Makefile\$#include $common/Makefile#" "$hdr/Makefile"
    grep -qxF "include $common/Makefile" "$hdr/Makefile" ||
        die "could not point $hdr/Makefile at $common; its content: $(cat "$hdr/Makefile")"
}

# kmod/mig-v1-sample (our v1 migration sample mdev), built in $WORK so the source folder stays
# clean. Rebuilt when its sources change; a compiler warning (W=1) fails the build.
build_v1_sample() {
    local abi=$1 src=$REPO_ROOT/kmod/mig-v1-sample dir=$WORK/kernel/$1/mig-v1-sample
    local hdr=$WORK/kernel/$abi/root/usr/src/linux-headers-$abi-amd64
    if [[ -f $dir/mig_v1_sample.ko && $dir/mig_v1_sample.ko -nt $src/mig_v1_sample.c &&
        $dir/mig_v1_sample.ko -nt $src/Kbuild ]]; then
        return 0
    fi
    mkdir -p "$dir"
    cp "$src/Kbuild" "$src/mig_v1_sample.c" "$dir/"
    log "building mig_v1_sample.ko (kmod/mig-v1-sample, W=1) against linux-headers-$abi-amd64"
    make -C "$hdr" M="$dir" W=1 modules >"$dir/build.log" 2>&1 || {
        cat "$dir/build.log" >&2
        die "building mig_v1_sample.ko failed (log: $dir/build.log)"
    }
    if grep -qiE 'warning:|error:' "$dir/build.log"; then
        cat "$dir/build.log" >&2
        rm -f "$dir/mig_v1_sample.ko"
        die "mig_v1_sample.ko built with warnings (log: $dir/build.log)"
    fi
    [[ -f $dir/mig_v1_sample.ko ]] || die "mig_v1_sample.ko not produced (log: $dir/build.log)"
}

main() {
    local abi ver
    if [[ -s $WORK/kernel/current && ${VFIO_MIG_GUEST_KERNEL_REFRESH:-0} != 1 &&
        (-z ${VFIO_MIG_GUEST_KERNEL_ABI:-} || $(cat "$WORK/kernel/current") == "${VFIO_MIG_GUEST_KERNEL_ABI:-}") ]]; then
        abi=$(cat "$WORK/kernel/current")
        if [[ -f $WORK/kernel/$abi/.extracted && -f $WORK/kernel/$abi/mtty/mtty.ko ]]; then
            log "kernel: cached $abi"
            repoint_headers "$abi"
            build_v1_sample "$abi"
            return 0
        fi
    fi
    local found
    if ! found=$(resolve_abi); then
        # apt-cache knows nothing before a first 'apt-get update' (or knows a stale list).
        log "no complete linux 6.12 kernel known to apt yet: apt-get update"
        apt-get update -q >&2
        found=$(resolve_abi) ||
            die "no linux 6.12 ABI with linux-image-*-amd64-unsigned, linux-headers-*-amd64, -common, linux-kbuild-* and linux-source-6.12 of one version (is bookworm-security configured?)"
    fi
    read -r abi ver <<<"$found"
    log "kernel: $abi (version $ver)"
    prepare_kernel "$abi" "$ver"
    fetch_mtty_source "$abi" "$ver"
    repoint_headers "$abi"
    build_mtty "$abi"
    build_v1_sample "$abi"
    echo "$abi" >"$WORK/kernel/current"
    # Drop kernels of other ABIs (~200 MB each).
    local d
    for d in "$WORK"/kernel/*/; do
        [[ $(basename "$d") == "$abi" ]] || rm -rf "$d"
    done
    log "kernel: ready ($WORK/kernel/$abi)"
}

main "$@"
