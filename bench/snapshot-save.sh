#!/usr/bin/env bash
# Snapshot save, meshd against etcd 3.4.23 and 3.5.1 on the same machine in one run:
# one member each, KEYS keys of 256 bytes loaded with meshctl bench, then
# `etcdctl snapshot save` timed ROUNDS times per system (alternating), and the file
# checked with etcdutl 3.5.1's `snapshot status`.
#
#   BUILD=1 KEYS=200000 ROUNDS=3 bench/snapshot-save.sh
set -euo pipefail
cd "$(dirname "$0")/.."
KEYS=${KEYS:-200000}
ROUNDS=${ROUNDS:-3}
[ "${BUILD:-1}" = 1 ] && cargo build --release -p meshd -p meshctl >&2
E351="$(scripts/etcd-3.5.1)"
source scripts/lib/cluster.sh
MESHCTL=target/release/meshctl

port() { free_port; }
declare -A endpoint
m_client=$(port)
target/release/meshd --name m --data-dir "$work/meshd" --listen-client "127.0.0.1:$m_client" \
  --listen-mesh "127.0.0.1:$(port)" >"$work/meshd.log" 2>&1 &
pids+=($!)
endpoint[meshd]="127.0.0.1:$m_client"
for sys in etcd-3.4.23 etcd-3.5.1; do
  bin=etcd; [ "$sys" = etcd-3.5.1 ] && bin="$E351/etcd"
  c=$(port); p=$(port)
  "$bin" --name e --data-dir "$work/$sys" --listen-client-urls "http://127.0.0.1:$c" \
    --advertise-client-urls "http://127.0.0.1:$c" --listen-peer-urls "http://127.0.0.1:$p" \
    --initial-advertise-peer-urls "http://127.0.0.1:$p" --initial-cluster "e=http://127.0.0.1:$p" \
    >"$work/$sys.log" 2>&1 &
  pids+=($!)
  endpoint[$sys]="127.0.0.1:$c"
done
for sys in meshd etcd-3.4.23 etcd-3.5.1; do
  for _ in $(seq 1 100); do
    "$MESHCTL" --endpoints "${endpoint[$sys]}" endpoint health >/dev/null 2>&1 && break
    sleep 0.2
  done
  "$MESHCTL" --endpoints "${endpoint[$sys]}" bench put --clients 64 --conns 8 --total "$KEYS" \
    --key-size 16 --val-size 256 --key-space-size "$KEYS" --sequential-keys >/dev/null
done
echo "snapshot save of $KEYS keys (256 B values), seconds per round:"
for r in $(seq 1 "$ROUNDS"); do
  for sys in meshd etcd-3.4.23 etcd-3.5.1; do
    f="$work/$sys.$r.db"
    start=$(date +%s.%N)
    ETCDCTL_API=3 etcdctl --endpoints "${endpoint[$sys]}" snapshot save "$f" >/dev/null 2>&1
    end=$(date +%s.%N)
    st=$("$E351/etcdutl" snapshot status "$f" -w json)
    printf '%-12s round %d: %6.2f s  %s\n' "$sys" "$r" "$(echo "$end - $start" | bc)" "$st"
    rm -f "$f"
  done
done
