#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# Builds igb-vfio-pci.ko (the fixture's driver/ with driver/compat-6.12.patch applied) against
# the headers of the Debian guest kernel that kernel.sh prepared, into
# $WORK/igb/driver/<abi>-<key>/igb-vfio-pci.ko; the key hashes the driver's files, so a second run
# costs nothing. Any compiler warning fails the step.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

main() {
    igb_check_fixture
    local abi key dir hdr
    abi=$(current_abi)
    key=$(cat "$IGB_FIXTURE"/driver/{main.c,Kbuild,Makefile,compat-6.12.patch} | sha256sum | cut -c1-12)
    dir=$IGB_WORK/driver/$abi-$key
    hdr=$WORK/kernel/$abi/root/usr/src/linux-headers-$abi-amd64
    [[ -f $hdr/Makefile ]] || die "igb driver: no $hdr: run scripts/guest/kernel.sh"
    if [[ ! -f $dir/igb-vfio-pci.ko ]]; then
        rm -rf "$dir"
        mkdir -p "$dir"
        cp "$IGB_FIXTURE"/driver/{main.c,Kbuild,Makefile} "$dir/"
        patch -d "$dir" -p1 -s <"$IGB_FIXTURE/driver/compat-6.12.patch"
        log "igb driver: building igb-vfio-pci.ko against linux-headers-$abi-amd64"
        make -C "$hdr" M="$dir" modules >"$dir/build.log" 2>&1 ||
            { cat "$dir/build.log" >&2; die "igb driver: build failed ($dir/build.log)"; }
        if grep -qiE 'warning:|error:' "$dir/build.log"; then
            cat "$dir/build.log" >&2
            rm -f "$dir/igb-vfio-pci.ko"
            die "igb driver: igb-vfio-pci.ko built with warnings ($dir/build.log)"
        fi
    else
        log "igb driver: cached $abi-$key"
    fi
    echo "$abi-$key" >"$IGB_WORK/driver/current"
}

main "$@"
