# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Kernel modules and cpio packing for the initramfs builders (initramfs.sh, igb/initramfs.sh): index a
# kernel's modules, then visit the wanted ones; ORDER ends up dependencies first (modinfo
# depends, softdep pre before and post after). Sourced after lib.sh, not run.
# shellcheck shell=bash

declare -A MOD_PATH=()   # module name (underscores) -> .ko or .ko.xz file
declare -A MOD_STATE=()  # name -> visiting|done
ORDER=()

index_modules() {
    local moddir=$1 f name
    while IFS= read -r -d '' f; do
        name=${f##*/}
        name=${name%%.ko*}
        MOD_PATH[${name//-/_}]=$f
    done < <(find "$moddir" -name '*.ko*' -print0)
}

# Depth-first, dependencies first: appends the load order to ORDER.
visit() {
    local name=${1//-/_} optional=${2:-} f dep
    [[ ${MOD_STATE[$name]:-} == "done" ]] && return 0
    [[ ${MOD_STATE[$name]:-} == visiting ]] && die "module dependency cycle at $name"
    f=${MOD_PATH[$name]:-}
    if [[ -z $f ]]; then
        [[ -n $optional ]] && return 0
        die "module $name not found in the kernel package (nor built)"
    fi
    MOD_STATE[$name]=visiting
    for dep in $(modinfo -F depends "$f" | tr ',' ' '); do
        visit "$dep"
    done
    for dep in $(modinfo -F softdep "$f" | sed -n 's/.*pre:\(.*\)/\1/p' | sed 's/post:.*//'); do
        visit "$dep" optional
    done
    MOD_STATE[$name]="done"
    ORDER+=("$name")
    for dep in $(modinfo -F softdep "$f" | sed -n 's/.*post:\(.*\)/\1/p' | sed 's/pre:.*//'); do
        visit "$dep" optional
    done
}

# Copies the modules of ORDER, decompressed, into directory $1 as <name>.ko.
copy_modules() {
    local m
    for m in "${ORDER[@]}"; do
        case ${MOD_PATH[$m]} in
            *.ko.xz) xz -dc "${MOD_PATH[$m]}" >"$1/$m.ko" ;;
            *.ko.zst) zstd -qdc "${MOD_PATH[$m]}" >"$1/$m.ko" ;;
            *.ko.gz) gzip -dc "${MOD_PATH[$m]}" >"$1/$m.ko" ;;
            *.ko) cp "${MOD_PATH[$m]}" "$1/$m.ko" ;;
            *) die "unknown module file ${MOD_PATH[$m]}" ;;
        esac
    done
}

# Packs directory $1 into the newc cpio archive $2 (uncompressed, reproducible order).
write_cpio() {
    (cd "$1" && find . -print0 | LC_ALL=C sort -z |
        cpio --null --create --format=newc --owner=0:0 --quiet) >"$2.tmp"
    mv "$2.tmp" "$2"
}
