#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# Builds the project's guest kernel: a small x86_64 kernel from linux-source-6.12 (the version
# of the Debian kernel kernel.sh chose), `make tinyconfig` + iommufd-kernel.config (IOMMUFD,
# VFIO_DEVICE_CDEV, VFIO group + container + type1, mdev and the mtty sample all built in), so
# the guest tests also run with devices opened through /dev/iommu and /dev/vfio/devices/vfioN;
# and PCI, the Intel IOMMU, vfio-pci and igb built in for the igb guest (igb/), where
# IOMMUFD_DRIVER lets DMA_LOGGING_REPORT answer. The Debian kernel has neither, hence this build.
#
# Cached in $WORK/ikernel/<version>-<hash of the fragment and recipe>/: bzImage, config,
# build.log and kbuild/, the tree external modules build against (the kernel's own
# scripts/package/install-extmod-build, as in a linux-headers package); $WORK/ikernel/current
# names the ready one. A cache hit costs nothing; a build takes ~5 min on 2 idle cores
# (extraction ~15-40 s, config ~15 s, make ~8 min of CPU; 15 min on a busy shared machine). The source tree and build dir (~1.5 GB) are scratch
# space: on /dev/shm when it has room (many small files are slow on the disk), deleted after.
#
# Then (every run, cached by mtime) builds our v1 sample module kmod/mig-v1-sample against
# kbuild/, into <cache>/mig-v1-sample/mig_v1_sample.ko, which the initramfs carries for this
# kernel.
#
# Knobs:
#   VFIO_MIG_GUEST_IOMMUFD=0        no iommufd run of the mtty tests; the kernel is still built
#                                   for the igb guest unless VFIO_MIG_SKIP_IGB=1 too
#   VFIO_MIG_GUEST_IKERNEL_JOBS=N   make -j (default: nproc)
#   VFIO_MIG_GUEST_IKERNEL_KEEP=1   keep the source tree and build dir (in $WORK/ikernel/)
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

APT_DL_OPTS=(-q -o APT::Sandbox::User=root)
MAKE=(make ARCH=x86_64)

# Prints the path of the linux-source-6.12 .deb of version $1, downloading it if needed.
source_deb() {
    local ver=$1 deb
    mkdir -p "$WORK/debs"
    deb=$(compgen -G "$WORK/debs/linux-source-6.12_${ver}_*.deb" | head -n1 || true)
    if [[ -z $deb ]]; then
        log "ikernel: downloading linux-source-6.12=$ver (~150 MB)"
        if ! (cd "$WORK/debs" && apt-get download "${APT_DL_OPTS[@]}" "linux-source-6.12=$ver" >&2); then
            log "ikernel: apt-get update and retry"
            apt-get update -q >&2
            (cd "$WORK/debs" && apt-get download "${APT_DL_OPTS[@]}" "linux-source-6.12=$ver" >&2)
        fi
        deb=$(compgen -G "$WORK/debs/linux-source-6.12_${ver}_*.deb" | head -n1)
    fi
    [[ -n $deb ]] || die "linux-source-6.12=$ver could not be downloaded"
    echo "$deb"
}

# Extracts the kernel tree of .deb $1 into $2 (without Documentation's subtrees and the
# perf/selftests sources: only Documentation/Kconfig is needed to configure and build).
extract_source() {
    local deb=$1 src=$2 tmp=$2.tmp
    rm -rf "$src" "$tmp"
    mkdir -p "$tmp"
    # No --strip-components: with it GNU tar fails to restore some directories' metadata.
    dpkg-deb --fsys-tarfile "$deb" | tar -xO ./usr/src/linux-source-6.12.tar.xz | xz -dc |
        tar -x -C "$tmp" --wildcards \
            --exclude='*/Documentation/*/*' --exclude='*/tools/perf' --exclude='*/tools/testing'
    mv "$tmp/linux-source-6.12" "$src"
    rmdir "$tmp"
    [[ -f $src/Makefile && -f $src/samples/vfio-mdev/mtty.c ]] ||
        die "linux-source tree incomplete in $src"
}

# Checks the fragment's options in .config $1: each =y must be there (fatal), each "is not
# set" should be (warning).
verify_config() {
    local config=$1 line opt missing=() still=()
    while IFS= read -r line; do
        case $line in
            CONFIG_*=*)
                grep -qxF "$line" "$config" || missing+=("$line (have: $(grep -E "^(# )?${line%%=*}[= ]" "$config" || echo 'not visible'))")
                ;;
            '# CONFIG_'*' is not set')
                opt=${line#'# '}
                opt=${opt%' is not set'}
                grep -q "^$opt=" "$config" && still+=("$opt")
                ;;
        esac
    done <"$IKERNEL_FRAGMENT"
    if ((${#still[@]})); then
        log "ikernel: note: still set by other options (harmless): ${still[*]}"
    fi
    if ((${#missing[@]})); then
        printf '  %s\n' "${missing[@]}" >&2
        die "ikernel: ${#missing[@]} option(s) of $(basename "$IKERNEL_FRAGMENT") did not land in $config (unmet dependencies?)"
    fi
}

# Scratch dir for the source tree and the build: /dev/shm (tmpfs) when it has 4 GB free and
# the tree is not to be kept, else $WORK/ikernel.
scratch_dir() {
    local avail
    if [[ ${VFIO_MIG_GUEST_IKERNEL_KEEP:-0} != 1 && -d /dev/shm && -w /dev/shm ]]; then
        avail=$(df -Pk /dev/shm 2>/dev/null | awk 'NR == 2 { print $4 }')
        if [[ -n $avail ]] && ((avail > 4 * 1024 * 1024)); then
            mktemp -d /dev/shm/vfio-mig-ikernel.XXXXXX
            return 0
        fi
    fi
    echo "$WORK/ikernel"
}

# Builds kmod/mig-v1-sample against the kernel's kbuild dir $1 into $2 (when its sources are
# newer than the module). Warnings are shown; the Debian-kernel build in kernel.sh is the one
# that fails on them.
build_v1_sample() {
    local kbuild=$1 dir=$2 src=$REPO_ROOT/kmod/mig-v1-sample
    [[ -f $src/mig_v1_sample.c ]] || return 0
    if [[ -f $dir/mig_v1_sample.ko && $dir/mig_v1_sample.ko -nt $src/mig_v1_sample.c &&
        $dir/mig_v1_sample.ko -nt $src/Kbuild ]]; then
        return 0
    fi
    rm -rf "$dir"
    mkdir -p "$dir"
    cp "$src/Kbuild" "$src/mig_v1_sample.c" "$dir/"
    log "ikernel: building mig_v1_sample.ko (kmod/mig-v1-sample) for the iommufd kernel"
    make -C "$kbuild" M="$dir" W=1 modules >"$dir/build.log" 2>&1 || {
        cat "$dir/build.log" >&2
        die "ikernel: building mig_v1_sample.ko failed (log: $dir/build.log)"
    }
    if grep -qiE 'warning:' "$dir/build.log"; then
        grep -iE 'warning:' "$dir/build.log" | sed 's/^/    /' >&2
        log "ikernel: mig_v1_sample.ko built with the warnings above (log: $dir/build.log)"
    fi
    [[ -f $dir/mig_v1_sample.ko ]] || die "ikernel: mig_v1_sample.ko not produced (log: $dir/build.log)"
}

main() {
    if ! ikernel_needed; then
        log "ikernel: VFIO_MIG_GUEST_IOMMUFD=0 and VFIO_MIG_SKIP_IGB=1: no kernel to build"
        return 0
    fi
    local ver key dir
    ver=$(current_version)
    key=$(ikernel_key "$ver")
    dir=$WORK/ikernel/$key
    if [[ -s $dir/bzImage && -f $dir/kbuild/Module.symvers ]]; then
        echo "$key" >"$WORK/ikernel/current"
        log "ikernel: cached $key"
        build_v1_sample "$dir/kbuild" "$dir/mig-v1-sample"
        return 0
    fi
    local missing=() tool
    for tool in make gcc flex bison bc perl; do
        command -v "$tool" >/dev/null || missing+=("$tool")
    done
    [[ -e /usr/include/libelf.h || -e /usr/include/elfutils/libelf.h ]] || missing+=(libelf-dev)
    ((${#missing[@]} == 0)) || die "ikernel: missing build tools: ${missing[*]} (run packages.sh)"

    mkdir -p "$WORK/ikernel"
    local scratch src out t0=$SECONDS t
    scratch=$(scratch_dir)
    src=$scratch/src
    out=$scratch/build
    if [[ $scratch == /dev/shm/* ]]; then
        # shellcheck disable=SC2064 # expand now: the path is fixed
        trap "rm -rf '$scratch'" EXIT
    fi
    log "ikernel: building in $scratch"
    local deb
    deb=$(source_deb "$ver")
    log "ikernel: extracting $(basename "$deb")"
    extract_source "$deb" "$src"
    log "ikernel: extracted in $((SECONDS - t0))s"

    t=$SECONDS
    rm -rf "$out"
    mkdir -p "$out"
    local cfglog=$WORK/ikernel/config.log
    {
        "${MAKE[@]}" -C "$src" O="$out" tinyconfig &&
            (cd "$out" && "$src/scripts/kconfig/merge_config.sh" -m .config "$IKERNEL_FRAGMENT") &&
            "${MAKE[@]}" -C "$src" O="$out" olddefconfig
    } >"$cfglog" 2>&1 || {
        tail -n 40 "$cfglog" >&2
        die "ikernel: configuring failed (log: $cfglog)"
    }
    verify_config "$out/.config"
    log "ikernel: configured in $((SECONDS - t))s (tinyconfig + $(basename "$IKERNEL_FRAGMENT"), all options verified)"

    t=$SECONDS
    local jobs=${VFIO_MIG_GUEST_IKERNEL_JOBS:-$(nproc)}
    log "ikernel: make -j$jobs bzImage modules (~4 min on 2 cores)"
    local buildlog=$WORK/ikernel/build.log
    # `modules` writes Module.symvers (no module is configured): external modules need it.
    "${MAKE[@]}" -C "$src" O="$out" -j"$jobs" bzImage modules >"$buildlog" 2>&1 || {
        tail -n 40 "$buildlog" >&2
        die "ikernel: kernel build failed (log: $buildlog)"
    }
    log "ikernel: built in $((SECONDS - t))s"

    local tmp=$dir.tmp
    rm -rf "$tmp"
    mkdir -p "$tmp"
    cp "$out/arch/x86/boot/bzImage" "$tmp/bzImage"
    cp "$out/.config" "$tmp/config"
    # What building an external module against this kernel needs (as linux-headers packages).
    (cd "$out" && srctree=$src SRCARCH=x86 CC=gcc HOSTCC=gcc MAKE=make \
        sh "$src/scripts/package/install-extmod-build" "$tmp/kbuild") >>"$buildlog" 2>&1 || {
        tail -n 20 "$buildlog" >&2
        die "ikernel: install-extmod-build failed (log: $buildlog)"
    }
    cp "$out/.config" "$tmp/kbuild/.config"
    [[ -f $tmp/kbuild/Module.symvers ]] || die "ikernel: no Module.symvers in $tmp/kbuild"
    mv "$buildlog" "$tmp/build.log"
    mv "$cfglog" "$tmp/config.log"
    rm -rf "$dir"
    mv "$tmp" "$dir"
    echo "$key" >"$WORK/ikernel/current"
    if [[ ${VFIO_MIG_GUEST_IKERNEL_KEEP:-0} != 1 ]]; then
        rm -rf "$src" "$out"
        [[ $scratch != /dev/shm/* ]] || rm -rf "$scratch"
    fi
    # The source package is no longer needed (kernel.sh kept it for this build).
    rm -f "$deb"
    # Drop kernels of other versions or fragments.
    local d
    for d in "$WORK"/ikernel/*/; do
        d=${d%/}
        case $(basename "$d") in
            "$key" | src | build) ;;
            *) rm -rf "$d" ;;
        esac
    done
    log "ikernel: ready $dir/bzImage ($(du -h "$dir/bzImage" | cut -f1)) in $((SECONDS - t0))s"
    build_v1_sample "$dir/kbuild" "$dir/mig-v1-sample"
}

main "$@"
