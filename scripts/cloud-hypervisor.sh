#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# Proof against a real VMM: Cloud Hypervisor (ae44c297, in ../shared/cloud-hypervisor) with its
# VFIO migration replaced by vfio-mig (vmm-glue/cloud-hypervisor/vfio-mig.patch, see
# docs/embedding.md). Copies the tree and its one git dependency (micro_http) into a scratch
# directory, points micro_http at the copy, links this checkout beside the tree (the patch
# depends on ../../vfio-mig/vfio-mig), applies the patch, builds Cloud Hypervisor and runs its
# tests that need no KVM.
#
#   VFIO_MIG_CH_SHARED   where cloud-hypervisor/ and cloud-hypervisor-deps/ are (../shared)
#   VFIO_MIG_CH_SCRATCH  the scratch directory; its target/ is kept as a cache
#                        (target/cloud-hypervisor)
#   VFIO_MIG_SKIP_CH=1   skip, saying so: not a full pass
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

log() { printf '[cloud-hypervisor] %s\n' "$*"; }
die() { printf '[cloud-hypervisor] error: %s\n' "$*" >&2; exit 1; }

if [ "${VFIO_MIG_SKIP_CH:-0}" = 1 ]; then
    log "SKIPPED (VFIO_MIG_SKIP_CH=1): the Cloud Hypervisor patch was not built or tested; this is not a full pass"
    exit 0
fi

shared=${VFIO_MIG_CH_SHARED:-$root/../shared}
[ -f "$shared/cloud-hypervisor/Cargo.toml" ] ||
    die "no Cloud Hypervisor tree at $shared/cloud-hypervisor (set VFIO_MIG_CH_SHARED, or VFIO_MIG_SKIP_CH=1 to skip: not a full pass)"
[ -f "$shared/cloud-hypervisor-deps/micro-http/Cargo.toml" ] ||
    die "no micro_http at $shared/cloud-hypervisor-deps/micro-http (set VFIO_MIG_CH_SHARED, or VFIO_MIG_SKIP_CH=1 to skip: not a full pass)"
command -v git >/dev/null || die "git is needed to apply the patch"

glue=$root/vmm-glue/cloud-hypervisor
scratch=${VFIO_MIG_CH_SCRATCH:-$root/target/cloud-hypervisor}
src=$scratch/src
export CARGO_TARGET_DIR=$scratch/target

log "copying $shared/cloud-hypervisor and -deps into $src"
rm -rf "$src"
mkdir -p "$src"
cp -r "$shared/cloud-hypervisor" "$shared/cloud-hypervisor-deps" "$src/"
chmod -R u+w "$src"
ln -s "$root" "$src/vfio-mig"

cd "$src/cloud-hypervisor"
log "micro_http from the local copy ([patch] in Cargo.toml)"
cat >>Cargo.toml <<'TOML'

[patch."https://github.com/firecracker-microvm/micro-http"]
micro_http = { path = "../cloud-hypervisor-deps/micro-http" }
TOML
# The tree has no lock file, and cargo resolves a patched git dependency offline only from
# one: ours pins what the tree builds with (e.g. vfio_user 0.1.5, on vfio-bindings 0.6).
cp "$glue/Cargo.lock" Cargo.lock

patch=$glue/vfio-mig.patch
log "applying $(basename "$patch")"
# The scratch copy may sit inside this checkout (target/): `git apply` there would resolve the
# patch's paths against this repository and skip every file without a word. A repository of
# its own makes the copy the top level.
git init -q .
git apply --whitespace=nowarn "$patch"
changed=$(git status --porcelain --untracked-files=all -- . ':!Cargo.toml' ':!Cargo.lock' | wc -l)
[ "$changed" -gt 0 ] || die "$(basename "$patch") changed no file of the tree"
git apply --numstat "$patch" |
    awk '{a += $1; d += $2; n++} END {printf "[cloud-hypervisor] patch: %d files, +%d -%d\n", n, a, d}'

start=$(date +%s)
log "cargo build -p cloud-hypervisor"
cargo build -p cloud-hypervisor
log "built $CARGO_TARGET_DIR/debug/cloud-hypervisor"

log "cargo test -p pci -p vm-migration (the patch's unit tests run against the vfio-mig mock)"
cargo test -p pci -p vm-migration 2>&1 | tee "$scratch/test.log"
passed=$(awk '/^test result: ok/ {n += $4} END {print n + 0}' "$scratch/test.log")
log "Cloud Hypervisor with vfio-mig: built, $passed tests passed in $(( $(date +%s) - start ))s"
