#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# Installs the Debian packages the guest harness needs, on Debian bookworm, as root.
# QEMU comes from bookworm-backports (10.x: bookworm's own 7.2 would remove an installed
# qemu-utils 10.x); a sources entry for backports is added that reuses the archive URI of the
# existing bookworm entry. Does nothing (no apt-get at all) when everything is already there.
#
# Knobs: VFIO_MIG_GUEST_SKIP_APT=1 skips this step entirely.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# Packages from bookworm itself. gcc-12, libelf1, libssl3 and zlib1g are what the extracted
# (not installed) linux-headers/linux-kbuild packages need to build a module; jq parses cargo's
# JSON; binutils gives readelf (static check of the binaries); libc6-dev has the static libc
# that crt-static links; util-linux has flock. flex, bison, bc, libelf-dev (objtool) and perl
# build the iommufd guest kernel (ikernel.sh).
BASE_PACKAGES=(busybox-static cpio kmod xz-utils gcc gcc-12 libc6-dev make pahole libelf1 libssl3
    zlib1g jq binutils coreutils util-linux dpkg flex bison bc libelf-dev perl)
BACKPORTS_PACKAGES=(qemu-system-x86)

is_installed() {
    [[ $(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null) == installed ]]
}

missing_packages() {
    local p
    for p in "$@"; do
        is_installed "$p" || printf '%s\n' "$p"
    done
}

# Prints the archive URI of the plain "bookworm" suite from the configured sources.
bookworm_archive_uri() {
    local f
    # deb822 (.sources) files: stanzas separated by blank lines.
    for f in /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list.d/*.sources; do
        [[ -f $f ]] || continue
        awk '
            function flush() {
                if (types ~ /(^| )deb( |$)/ && suites ~ /(^| )bookworm( |$)/ && uris != "" && !done) {
                    split(uris, u, " "); print u[1]; done = 1
                }
                types = ""; suites = ""; uris = ""
            }
            /^[ \t]*$/ { flush(); next }
            /^[ \t]*#/ { next }
            tolower($1) == "types:"  { $1 = ""; types = $0 }
            tolower($1) == "suites:" { $1 = ""; suites = $0 }
            tolower($1) == "uris:"   { $1 = ""; uris = $0; sub(/^ +/, "", uris) }
            END { flush() }
        ' "$f" | head -n1 | grep . && return 0
    done
    # One-line format: deb [options] URI bookworm components...
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [[ -f $f ]] || continue
        sed -E -n 's/^[[:space:]]*deb[[:space:]]+(\[[^]]*\][[:space:]]+)?([^[:space:]]+)[[:space:]]+bookworm[[:space:]].*/\2/p' "$f" |
            head -n1 | grep . && return 0
    done
    return 1
}

# Prints the Signed-By value of the bookworm stanza, if any (same keyring serves backports).
bookworm_signed_by() {
    awk '
        function flush() {
            if (suites ~ /(^| )bookworm( |$)/ && signed != "" && !done) { print signed; done = 1 }
            suites = ""; signed = ""
        }
        /^[ \t]*$/ { flush(); next }
        tolower($1) == "suites:"    { $1 = ""; suites = $0 }
        tolower($1) == "signed-by:" { $1 = ""; signed = $0; sub(/^ +/, "", signed) }
        END { flush() }
    ' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n1
}

backports_configured() {
    grep -Rqs --include='*.sources' --include='*.list' -E '(^|[[:space:]])bookworm-backports([[:space:]]|$)' \
        /etc/apt/sources.list /etc/apt/sources.list.d/
}

ensure_backports_source() {
    backports_configured && return 0
    local uri signed file=/etc/apt/sources.list.d/vfio-mig-bookworm-backports.sources
    uri=$(bookworm_archive_uri) ||
        die "no 'bookworm' entry found in /etc/apt/sources.list.d/*.sources or sources.list to derive the backports URI from"
    signed=$(bookworm_signed_by || true)
    log "adding bookworm-backports ($uri) in $file"
    {
        echo "# Added by vfio-mig scripts/guest/packages.sh (QEMU from bookworm-backports)."
        echo "Types: deb"
        echo "URIs: $uri"
        echo "Suites: bookworm-backports"
        echo "Components: main"
        [[ -n $signed ]] && echo "Signed-By: $signed"
    } >"$file"
}

main() {
    if [[ ${VFIO_MIG_GUEST_SKIP_APT:-0} == 1 ]]; then
        log "VFIO_MIG_GUEST_SKIP_APT=1: skipping package installation"
        return 0
    fi
    local base_missing bp_missing
    mapfile -t base_missing < <(missing_packages "${BASE_PACKAGES[@]}")
    mapfile -t bp_missing < <(missing_packages "${BACKPORTS_PACKAGES[@]}")
    if ((${#base_missing[@]} == 0 && ${#bp_missing[@]} == 0)) && command -v qemu-system-x86_64 >/dev/null; then
        log "packages: all present"
        return 0
    fi

    [[ $(id -u) == 0 ]] || die "packages missing (${base_missing[*]} ${bp_missing[*]}): run as root"
    # shellcheck disable=SC1091
    codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
    [[ $codename == bookworm ]] ||
        die "this harness expects Debian bookworm (found '${codename:-unknown}'); set VFIO_MIG_GUEST_SKIP_APT=1 to manage packages yourself"

    export DEBIAN_FRONTEND=noninteractive
    ensure_backports_source
    log "apt-get update"
    apt-get update -q
    if ((${#base_missing[@]})); then
        log "installing: ${base_missing[*]}"
        apt-get install -y -q --no-install-recommends "${base_missing[@]}"
    fi
    if ((${#bp_missing[@]})) || ! command -v qemu-system-x86_64 >/dev/null; then
        log "installing from bookworm-backports: ${BACKPORTS_PACKAGES[*]}"
        apt-get install -y -q --no-install-recommends -t bookworm-backports "${BACKPORTS_PACKAGES[@]}"
    fi
    command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 still missing after install"
    log "packages: done ($(qemu-system-x86_64 --version | head -n1))"
}

main "$@"
