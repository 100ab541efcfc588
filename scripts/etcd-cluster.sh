#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# A 3-member etcd cluster on loopback, for trying `vfio-mig --fence etcd://...` by hand
# (the test suite starts its own clusters, see vfio-mig/etcd/tests/common/cluster.rs).
#
#   scripts/etcd-cluster.sh start [DIR]   start members m0..m2 (data, logs and pids in DIR,
#                                         default /tmp/vfio-mig-etcd); prints the --fence URL
#   scripts/etcd-cluster.sh kill N [DIR]  SIGKILL member N (0..2), e.g. to watch a handoff
#                                         ride over a lost member
#   scripts/etcd-cluster.sh stop [DIR]    stop every member and remove DIR
#
# Clients on 127.0.0.1:23790-23792, peers on 127.0.0.1:23800-23802. Needs `etcd`
# (Debian: apt-get install etcd-server).
set -euo pipefail

cmd=${1:-}
case "$cmd" in
    kill) dir=${3:-/tmp/vfio-mig-etcd} ;;
    *) dir=${2:-/tmp/vfio-mig-etcd} ;;
esac
members=(0 1 2)
url="etcd://127.0.0.1:23790,127.0.0.1:23791,127.0.0.1:23792"

case "$cmd" in
start)
    command -v etcd >/dev/null || { echo "etcd-cluster: no etcd (apt-get install etcd-server)" >&2; exit 1; }
    mkdir -p "$dir"
    initial="m0=http://127.0.0.1:23800,m1=http://127.0.0.1:23801,m2=http://127.0.0.1:23802"
    for i in "${members[@]}"; do
        etcd --name "m$i" --data-dir "$dir/m$i" \
            --listen-client-urls "http://127.0.0.1:2379$i" \
            --advertise-client-urls "http://127.0.0.1:2379$i" \
            --listen-peer-urls "http://127.0.0.1:2380$i" \
            --initial-advertise-peer-urls "http://127.0.0.1:2380$i" \
            --initial-cluster "$initial" --initial-cluster-state new \
            --initial-cluster-token vfio-mig-etcd-cluster \
            >"$dir/m$i.log" 2>&1 </dev/null &
        echo $! >"$dir/m$i.pid"
    done
    # Ready when every member answers a (linearizable) read.
    for i in "${members[@]}"; do
        for _ in $(seq 100); do
            if curl -sf -X POST "http://127.0.0.1:2379$i/v3/kv/range" -d '{"key":"AA=="}' >/dev/null 2>&1; then
                continue 2
            fi
            sleep 0.2
        done
        echo "etcd-cluster: member m$i did not come up; see $dir/m$i.log" >&2
        exit 1
    done
    echo "$url"
    ;;
kill)
    n=${2:?usage: etcd-cluster.sh kill N [DIR]}
    kill -KILL "$(cat "$dir/m$n.pid")"
    ;;
stop)
    for i in "${members[@]}"; do
        [ -f "$dir/m$i.pid" ] && kill "$(cat "$dir/m$i.pid")" 2>/dev/null || true
    done
    for i in "${members[@]}"; do
        [ -f "$dir/m$i.pid" ] && while kill -0 "$(cat "$dir/m$i.pid")" 2>/dev/null; do sleep 0.1; done
    done
    rm -rf "$dir"
    ;;
*)
    sed -n '4,14p' "$0" >&2
    exit 2
    ;;
esac
