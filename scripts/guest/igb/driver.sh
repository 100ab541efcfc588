#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# Builds igb-vfio-pci.ko (the fixture's driver/ with driver/compat-6.12.patch applied) against
# the kbuild tree of the project's guest kernel that the igb guest boots (ikernel.sh), into
# $WORK/igb/driver/<kernel key>-<key>/igb-vfio-pci.ko; the key hashes the driver's files, so a
# second run costs nothing. Any compiler warning fails the step.
#
# One more 6.12 compatibility change than the fixture's patch makes: the driver imports the
# IOMMUFD symbol namespace (for iova_bitmap_set, which only a kernel with IOMMUFD_DRIVER
# exports; the Debian kernel's inline stub needed no import) with 6.13's string form,
# MODULE_IMPORT_NS("IOMMUFD"), which 6.12's macro stringifies once more, so modpost refuses the
# module; 6.12 takes the bare name, MODULE_IMPORT_NS(IOMMUFD).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# Bump when this script builds differently from the same inputs (invalidates the cache).
RECIPE=2

main() {
    igb_check_fixture
    local kdir key dir kbuild name
    kdir=$(igb_kernel_dir)
    kbuild=$kdir/kbuild
    key=$({
        cat "$IGB_FIXTURE"/driver/{main.c,Kbuild,Makefile,compat-6.12.patch}
        echo "recipe $RECIPE"
    } | sha256sum | cut -c1-12)
    name=$(basename "$kdir")-$key
    dir=$IGB_WORK/driver/$name
    [[ -f $kbuild/Module.symvers ]] || die "igb driver: no $kbuild: run scripts/guest/ikernel.sh"
    if [[ ! -f $dir/igb-vfio-pci.ko ]]; then
        rm -rf "$dir"
        mkdir -p "$dir"
        cp "$IGB_FIXTURE"/driver/{main.c,Kbuild,Makefile} "$dir/"
        patch -d "$dir" -p1 -s <"$IGB_FIXTURE/driver/compat-6.12.patch"
        sed -i 's/^MODULE_IMPORT_NS("IOMMUFD");$/MODULE_IMPORT_NS(IOMMUFD);/' "$dir/main.c"
        grep -qx 'MODULE_IMPORT_NS(IOMMUFD);' "$dir/main.c" ||
            die "igb driver: no MODULE_IMPORT_NS(\"IOMMUFD\") line in the fixture's main.c to adapt to 6.12"
        log "igb driver: building igb-vfio-pci.ko against the guest kernel $(basename "$kdir")"
        make -C "$kbuild" M="$dir" modules >"$dir/build.log" 2>&1 ||
            { cat "$dir/build.log" >&2; die "igb driver: build failed ($dir/build.log)"; }
        if grep -qiE 'warning:|error:' "$dir/build.log"; then
            cat "$dir/build.log" >&2
            rm -f "$dir/igb-vfio-pci.ko"
            die "igb driver: igb-vfio-pci.ko built with warnings ($dir/build.log)"
        fi
    else
        log "igb driver: cached $name"
    fi
    echo "$name" >"$IGB_WORK/driver/current"
    # Builds for other kernels or driver versions.
    local d
    for d in "$IGB_WORK"/driver/*/; do
        d=${d%/}
        [[ $(basename "$d") == "$name" ]] || rm -rf "$d"
    done
}

main "$@"
