#!/usr/bin/env bash
# A long run: puts at a fixed rate for DURATION seconds against three-member clusters of
# meshd, etcd 3.4.23 (Debian) and etcd 3.5.1 (official binaries), one system at a time,
# with history auto-compaction every minute (periodic, 1m retention) and Raft snapshots
# at each system's default. Latency percentiles per minute (bench/etcd-load steady: open
# loop, each put timed from when it was due, so a stall counts against every put it
# delays).
#
# RATE defaults to 70 % of the better etcd's throughput in a 100-client put run measured
# first (bench/etcd-load put, 20,000 puts). For each system it prints one line per
# minute, then: the median of the per-minute p99s ("steady p99"), the worst minute's p99
# against it, the whole run's p99.9, and how many compactions and snapshots happened.
#
#   bench/longrun.sh                              # 10 minutes per system
#   DURATION=120 WINDOW=20 bench/longrun.sh       # a short look
#   RATE=4000 SYSTEMS="meshd etcd-3.5.1" BUILD=0 bench/longrun.sh
#   MESHD=/tmp/old/meshd RATE=4937 SYSTEMS=meshd BUILD=0 bench/longrun.sh   # another build
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-600}
WINDOW=${WINDOW:-60}
RATE=${RATE:-}
SYSTEMS=${SYSTEMS:-"meshd etcd-3.4.23 etcd-3.5.1"}
BUILD=${BUILD:-1}
command -v etcd >/dev/null || { echo "needs etcd: apt-get install etcd-server" >&2; exit 1; }
[ "$BUILD" = 0 ] || cargo build --release -q -p meshd -p meshctl -p etcd-load
MESHD=${MESHD:-target/release/meshd}
source scripts/lib/cluster.sh
source bench/members.sh
LOAD=target/release/etcd-load
PUT=(--clients 100 --conns 12 --key-space-size 100000 --val-size 256)

start_cluster_of() { # SYSTEM: three fresh members, auto-compaction every minute
  local sys=$1 i init
  mpid=()
  for i in 0 1 2; do cport[$i]=$(free_port); pport[$i]=$(free_port); done
  init=$(initial "$sys" 3)
  for i in 0 1 2; do
    start_member "$sys" "$i" "$init" new --auto-compaction-mode periodic --auto-compaction-retention 1m
  done
  eps="127.0.0.1:${cport[0]},127.0.0.1:${cport[1]},127.0.0.1:${cport[2]}"
  for _ in $(seq 1 600); do
    ETCDCTL_API=3 "$E351/etcdctl" --endpoints "$eps" endpoint health --cluster >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "$sys did not become healthy" >&2; tail -n 20 "$work"/*.log >&2; exit 1
}

# One system's report, from etcd-load steady's JSON on stdin.
REPORT=$(cat <<'EOF'
import json, statistics, sys
name, compactions, snapshots = sys.argv[1:4]
d = json.load(sys.stdin)
print(f"{name}: {d['succeeded']} puts, {d['errors']} errors"
      + (f" (first: {d['first_error']})" if d["errors"] else "")
      + f", {d['throughput_rps']:.0f}/s")
print(f"  {'from_s':>6} {'puts':>7} {'p50_ms':>8} {'p99_ms':>8} {'p99.9_ms':>9} {'max_ms':>8}")
for w in d["windows"]:
    print(f"  {w['from_secs']:>6} {w['count']:>7} {w['p50']:>8.2f} {w['p99']:>8.2f} {w['p99_9']:>9.2f} {w['max']:>8.2f}")
p99s = [w["p99"] for w in d["windows"] if w["count"]]
steady = statistics.median(p99s)
worst = max(p99s)
whole = d["latency_ms"]
print(f"  steady p99 {steady:.2f} ms; worst minute p99 {worst:.2f} ms ({worst / steady:.2f}x); "
      f"whole run p99 {whole['p99']:.2f} p99.9 {whole['p99_9']:.2f} max {whole['max']:.2f} ms; "
      f"{compactions} auto-compactions, {snapshots} snapshots (member 0)")
EOF
)

if [ -z "$RATE" ]; then
  best=0
  for sys in etcd-3.4.23 etcd-3.5.1; do
    start_cluster_of "$sys"
    r=$($LOAD --endpoints "$eps" put "${PUT[@]}" --total 20000 | json '"%.0f" % d["throughput_rps"]')
    echo "$sys: $r puts/s with 100 clients"
    [ "$r" -gt "$best" ] && best=$r
    stop_members
    rm -rf "$work/$sys"-m*
  done
  RATE=$((best * 7 / 10))
fi
echo "long run: $RATE puts/s for $DURATION s per system, percentiles per $WINDOW s"

for sys in $SYSTEMS; do
  start_cluster_of "$sys"
  $LOAD --endpoints "$eps" steady "${PUT[@]}" --rate "$RATE" --duration "$DURATION" \
    --window "$WINDOW" >"$work/$sys.json"
  # Auto-compactions (meshd: logged by the leader; etcd: by every member, member 0
  # counted) and snapshots (member 0).
  case "$sys" in
    meshd)
      compactions=$(cat "$work/$sys"-m?.log | grep -c "auto-compacted history" || true)
      snapshots=$(grep -c "raft log compacted" "$work/$sys-m0.log" || true) ;;
    *)
      compactions=$(grep -c "finished scheduled compaction" "$work/$sys-m0.log" || true)
      snapshots=$(grep -c "saved snapshot" "$work/$sys-m0.log" || true) ;;
  esac
  stop_members
  rm -rf "$work/$sys"-m*
  python3 -c "$REPORT" "$sys" "$compactions" "$snapshots" <"$work/$sys.json"
done
