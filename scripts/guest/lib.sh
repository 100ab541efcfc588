# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Shared settings and helpers of the guest harness. Sourced by the other scripts, not run.
# shellcheck shell=bash disable=SC2034 # the variables are used by the scripts sourcing this

GUEST_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$GUEST_DIR/../.." && pwd)
WORK=${VFIO_MIG_GUEST_WORK:-$GUEST_DIR/.work}
TARGET_TRIPLE=x86_64-unknown-linux-gnu
# Separate target dir: the static (crt-static) build must not invalidate the host build cache.
GUEST_TARGET_DIR=${VFIO_MIG_GUEST_TARGET_DIR:-$REPO_ROOT/target/guest}

mkdir -p "$WORK"

log() { printf '[guest %s] %s\n' "$(date +%T)" "$*" >&2; }
die() {
    printf '[guest %s] ERROR: %s\n' "$(date +%T)" "$*" >&2
    exit 1
}

# Console text without carriage returns and terminal escape sequences (SeaBIOS emits some).
clean_console() {
    sed -E $'s/\r//g; s/\x1b\\[[0-9;?]*[A-Za-z]//g; s/\x1b[@-Z\\\\-_a-z]//g'
}

# The kernel ABI chosen by kernel.sh (e.g. 6.12.117+deb12), recorded for the later steps.
current_abi() {
    [[ -s $WORK/kernel/current ]] || die "no kernel prepared yet: run scripts/guest/kernel.sh (or run.sh)"
    cat "$WORK/kernel/current"
}

# The Debian package version of the current kernel ABI (e.g. 6.12.117-1~deb12u1): the version
# of linux-source-6.12 that matches it. Read from the extracted image's changelog.
current_version() {
    local abi ver
    abi=$(current_abi)
    ver=$(zcat "$WORK/kernel/$abi/root/usr/share/doc/linux-image-$abi-amd64-unsigned/changelog.Debian.gz" 2>/dev/null |
        sed -n '1s/^[^ ]* (\([^)]*\)).*/\1/p')
    [[ -n $ver ]] || die "cannot read the package version of kernel $abi (run kernel.sh)"
    echo "$ver"
}

# The project's own guest kernel (ikernel.sh): a small kernel built from linux-source-6.12 with
# IOMMUFD, VFIO_DEVICE_CDEV, VFIO (group and container too) and the mtty sample built in, for
# the iommufd run of the mtty tests; and PCI, the Intel IOMMU, vfio-pci-core and igb, for the
# igb guest (igb/), where IOMMUFD_DRIVER makes DMA_LOGGING_REPORT work.
IKERNEL_FRAGMENT=$GUEST_DIR/iommufd-kernel.config
# Bump when ikernel.sh builds differently from the same fragment (invalidates the cache).
IKERNEL_RECIPE=2

# Cache key of the iommufd kernel for package version $1: the version plus a hash of the
# fragment and the recipe, e.g. 6.12.117-1~deb12u1-3f2a9c1d7b2e.
ikernel_key() {
    local hash
    hash=$({ cat "$IKERNEL_FRAGMENT"; echo "recipe $IKERNEL_RECIPE"; } | sha256sum | cut -c1-12)
    echo "$1-$hash"
}

# Whether the iommufd kernel run is enabled (VFIO_MIG_GUEST_IOMMUFD, default 1).
ikernel_enabled() {
    [[ ${VFIO_MIG_GUEST_IOMMUFD:-1} != 0 ]]
}

# Whether the igb guest is skipped by the user's explicit opt-out (VFIO_MIG_SKIP_IGB=1).
igb_skipped() {
    [[ ${VFIO_MIG_SKIP_IGB:-0} == 1 ]]
}

# Whether ikernel.sh must build the kernel: for the iommufd run or for the igb guest.
ikernel_needed() {
    ikernel_enabled || ! igb_skipped
}
