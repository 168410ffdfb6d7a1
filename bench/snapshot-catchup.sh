#!/usr/bin/env bash
# A member that missed a multi-GiB load catches up by snapshot. Three members on
# loopback; member m2 is stopped, GIB gibibytes of VAL-byte values are written through
# the other two (their logs are compacted meanwhile), then m2 restarts. Prints the load
# time, the data dir size, the time from m2's restart until it serves the last key
# written (serializable read, its own state), the snapshot's size and transfer time
# from the logs, and m2's peak resident memory (VmHWM) during the catch-up.
#
#   GIB=2 bench/snapshot-catchup.sh          # BUILD=0 skips the release build
set -euo pipefail
cd "$(dirname "$0")/.."
GIB=${GIB:-2}
VAL=${VAL:-8192}
if [ "${BUILD:-1}" = 1 ]; then cargo build --release -p meshd -p meshctl; fi
B=target/release
work=$(mktemp -d)
cleanup() {
  for f in "$work"/*.pid; do [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

init=m0=127.0.0.1:17783,m1=127.0.0.1:17784,m2=127.0.0.1:17785
quota=$((4 * GIB * 1024 * 1024 * 1024))
start() {
  local i=$1
  $B/meshd --name "m$i" --data-dir "$work/m$i" --listen-client "127.0.0.1:1737$i" \
    --listen-mesh "127.0.0.1:1778$((3 + i))" --listen-metrics off --initial-cluster $init \
    --quota-backend-bytes $quota >>"$work/m$i.log" 2>&1 &
  echo $! >"$work/m$i.pid"
}
now() { date +%s.%N; }
for i in 0 1 2; do start "$i"; done
EP=127.0.0.1:17370,127.0.0.1:17371
until $B/meshctl --endpoints 127.0.0.1:17372 put warm up >/dev/null 2>&1; do sleep 0.2; done
until [ "$($B/meshctl --endpoints 127.0.0.1:17372 get warm --consistency s --print-value-only 2>/dev/null)" = up ]; do sleep 0.1; done
kill "$(cat "$work/m2.pid")"
rm "$work/m2.pid"
sleep 1

total=$((GIB * 1024 * 1024 * 1024 / VAL))
echo "loading $total values of $VAL bytes ($GIB GiB) through m0 and m1"
t0=$(now)
$B/meshctl --endpoints $EP bench put --clients 64 --conns 4 --total "$total" \
  --val-size "$VAL" --key-size 16 --key-space-size "$total" --sequential-keys >"$work/load.txt"
$B/meshctl --endpoints $EP put last done >/dev/null
t1=$(now)
echo "load: $(echo "$t1 - $t0" | bc) s; data dir of m0: $(du -sh "$work/m0" | cut -f1)"

t2=$(now)
start 2
pid=$(cat "$work/m2.pid")
peak=0
until [ "$($B/meshctl --endpoints 127.0.0.1:17372 get last --consistency s --print-value-only 2>/dev/null)" = done ]; do
  hwm=$(awk '/VmHWM/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)
  [ "${hwm:-0}" -gt "$peak" ] && peak=$hwm
  sleep 0.2
done
t3=$(now)
hwm=$(awk '/VmHWM/ {print $2}' "/proc/$pid/status")
[ "$hwm" -gt "$peak" ] && peak=$hwm
echo "catch-up of m2 (restart to serving the last key): $(echo "$t3 - $t2" | bc) s"
echo "m2 peak RSS during catch-up: $((peak / 1024)) MiB"
grep -h "snapshot built\|snapshot delivered" "$work/m0.log" "$work/m1.log" | sed 's/^/  leader: /' | tail -3
grep -h "installing snapshot" "$work/m2.log" | sed 's/^/  m2: /' | tail -2
