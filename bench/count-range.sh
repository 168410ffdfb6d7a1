#!/usr/bin/env bash
# Whole-keyspace reads on one member with N keys: count-only, keys-only and (with
# FULL=1) full ranges over every key, timed end to end with meshctl, ROUNDS times per
# binary. The keyspace is loaded once (by the first binary) and every binary is started
# on a copy of the same data dir, alternating, so they read identical data.
#
#   bench/count-range.sh                               # target/release/meshd, 1M keys
#   N=200000 bench/count-range.sh
#   MESHDS="/tmp/before/target/release/meshd target/release/meshd" bench/count-range.sh
#   ETCD=1 bench/count-range.sh                        # etcd 3.4 (Debian) on the same keys
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-1000000}
VAL=${VAL:-256}
ROUNDS=${ROUNDS:-3}
FULL=${FULL:-0}
MESHDS=${MESHDS:-target/release/meshd}
MESHCTL=target/release/meshctl
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

wait_up() {
  for _ in $(seq 1 600); do
    "$MESHCTL" --endpoints "$1" endpoint health >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "no healthy member at $1" >&2; return 1
}

# seconds of one run of: meshctl get "" --from-key OPTS
timed() {
  local ep=$1; shift
  local t0 t1
  t0=$(date +%s.%N)
  "$MESHCTL" --endpoints "$ep" --timeout 300s get "" --from-key "$@" > "$work/out"
  t1=$(date +%s.%N)
  echo "$t1 - $t0" | bc
}

measure() { # label endpoint
  local label=$1 ep=$2
  for r in $(seq 1 "$ROUNDS"); do
    local c k f=-
    c=$(timed "$ep" --count-only)
    local count; count=$(cat "$work/out")
    k=$(timed "$ep" --keys-only)
    [ "$FULL" = 1 ] && f=$(printf '%.2fs' "$(timed "$ep")")
    printf '%-40s round %d  count=%s  count-only %6.2fs  keys-only %6.2fs  full %s\n' \
      "$label" "$r" "$count" "$c" "$k" "$f"
  done
}

start_meshd() { # binary datadir
  "$1" --name bench --data-dir "$2" --listen-client 127.0.0.1:23790 \
    --listen-mesh 127.0.0.1:23791 > "$work/meshd.log" 2>&1 &
  pids+=($!)
  wait_up 127.0.0.1:23790
}

first=${MESHDS%% *}
start_meshd "$first" "$work/data"
echo "loading $N keys of $VAL bytes..."
"$MESHCTL" --endpoints 127.0.0.1:23790 bench put --total "$N" --clients 100 --conns 10 \
  --val-size "$VAL" --sequential-keys --key-space-size "$N" > "$work/load" 2>&1 \
  || { cat "$work/load"; exit 1; }
kill "${pids[-1]}"; wait "${pids[-1]}" 2>/dev/null || true
for pass in 1 2; do
  for bin in $MESHDS; do
    rm -rf "$work/copy"; cp -r "$work/data" "$work/copy"
    start_meshd "$bin" "$work/copy"
    measure "meshd $bin (pass $pass)" 127.0.0.1:23790
    kill "${pids[-1]}"; wait "${pids[-1]}" 2>/dev/null || true
  done
done

if [ "${ETCD:-0}" = 1 ]; then
  etcd --name e --data-dir "$work/etcd" --listen-client-urls http://127.0.0.1:23792 \
    --advertise-client-urls http://127.0.0.1:23792 --listen-peer-urls http://127.0.0.1:23793 \
    --quota-backend-bytes 8589934592 > "$work/etcd.log" 2>&1 &
  pids+=($!)
  wait_up 127.0.0.1:23792
  "$MESHCTL" --endpoints 127.0.0.1:23792 bench put --total "$N" --clients 100 --conns 10 \
    --val-size "$VAL" --sequential-keys --key-space-size "$N" > "$work/load" 2>&1
  measure "etcd $(etcd --version | awk 'NR == 1 {print $3}')" 127.0.0.1:23792
fi
