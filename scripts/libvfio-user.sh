#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# Builds libvfio-user's sample `server` and `client` (the vfio-user tests' peer) and prints the
# directory holding them, for VFIO_MIG_LIBVFIO_USER.
#
# The source is ../shared/libvfio-user beside the checkout, or VFIO_MIG_LIBVFIO_USER_SRC. It is
# never built in place (it may be read-only): a copy is built in
# ${XDG_CACHE_HOME:-~/.cache}/vfio-mig/libvfio-user-<hash of the source>, and reused while the
# source is unchanged. As root, the build tools (meson, ninja-build, pkg-config, libjson-c-dev,
# libcmocka-dev) are installed with apt when missing.
#
# The copy is patched before it is built: at efd091bc the samples' BAR1 is 0x3000 bytes, which
# the library's own BAR check (a power of 2, `bar_region_valid`) refuses, so the sample server
# exits at start. BAR1 becomes 0x4000 bytes in the server and in the client (whose iteration
# counts, 0x3000 / 1024 = 12 and 13, become 16 and 17). Nothing else changes; docs/vfio-user.md.
#
# Everything but the final directory goes to stderr.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
src="${VFIO_MIG_LIBVFIO_USER_SRC:-$repo/../shared/libvfio-user}"
if [ ! -f "$src/meson.build" ]; then
    echo "libvfio-user.sh: no libvfio-user source at $src (expected ../shared/libvfio-user" \
        "beside the checkout, or set VFIO_MIG_LIBVFIO_USER_SRC)" >&2
    exit 1
fi
src="$(cd "$src" && pwd)"

missing=()
for pkg in meson ninja-build pkg-config libjson-c-dev libcmocka-dev; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
        || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        echo "libvfio-user.sh: missing build packages: ${missing[*]} (install them as root)" >&2
        exit 1
    fi
    echo "libvfio-user.sh: installing ${missing[*]}" >&2
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2
fi

hash="$( (cd "$src" && find . -type f -not -path './build/*' -not -path './.git/*' -print0 \
    | sort -z | xargs -0 sha256sum; sha256sum < "$repo/scripts/libvfio-user.sh") | sha256sum | cut -c1-16)"

# Replaces the one line matching $2 in file $1 by $3, or fails.
patch_line() {
    local n
    n="$(grep -cF -- "$2" "$1" || true)"
    if [ "$n" != 1 ]; then
        echo "libvfio-user.sh: expected one '$2' in $1, found $n" >&2
        exit 1
    fi
    python3 - "$1" "$2" "$3" <<'PY'
import sys
path, old, new = sys.argv[1:]
text = open(path).read()
open(path, "w").write(text.replace(old, new))
PY
}
cache="${XDG_CACHE_HOME:-$HOME/.cache}/vfio-mig/libvfio-user-$hash"
if [ ! -x "$cache/build/samples/server" ] || [ ! -x "$cache/build/samples/client" ]; then
    echo "libvfio-user.sh: building $src in $cache" >&2
    rm -rf "$cache.tmp"
    mkdir -p "$cache.tmp"
    (cd "$src" && tar --exclude=./build --exclude=./.git -cf - .) | tar -C "$cache.tmp" -xf -
    patch_line "$cache.tmp/samples/server.c" "const size_t bar1_size = 0x3000;" \
        "const size_t bar1_size = 0x4000;"
    patch_line "$cache.tmp/samples/client.c" "size_t bar1_size = 0x3000;" "size_t bar1_size = 0x4000;"
    patch_line "$cache.tmp/samples/client.c" "assert(*nr_iters == 12);" "assert(*nr_iters == 16);"
    patch_line "$cache.tmp/samples/client.c" "assert(*nr_iters == 13);" "assert(*nr_iters == 17);"
    (cd "$cache.tmp" && meson setup build >&2 && nice -n 10 ninja -C build samples/server samples/client >&2)
    rm -rf "$cache"
    mv "$cache.tmp" "$cache"
fi
echo "$cache/build/samples"
